"""One real end-to-end run of the training pipeline on chest_xray_mini.zip.

Isolated stores: a temporary ZENML_CONFIG_PATH and a temporary SQLite MLflow.
The archive is found through $CHEST_XRAY_ZIP, so run.py stages it behind the
embedded moto S3 endpoint and ingest goes through the S3 code path.
"""

import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

from conftest import MINI_ZIP, ROOT, dataset_entries, deterministic_smoke_config, isolated_env, require
from xray.s3 import EmbeddedS3, make_client

pytestmark = pytest.mark.slow
STEPS = [
    "ingest_from_s3",
    "unzip_and_validate",
    "build_datasets",
    "train_model",
    "evaluate_model",
    "profile_reference",
    "register_model",
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Isolated stores, and the smoke config with a fixed low threshold (see deterministic_smoke_config)."""
    home = tmp_path_factory.mktemp("stores")
    config = deterministic_smoke_config(home / "smoke.yaml")
    return home, isolated_env(home, CHEST_XRAY_ZIP=str(require(MINI_ZIP)), XRAY_TEST_CONFIG=str(config))


def run_cli(env, *args, timeout=900):
    config = env["XRAY_TEST_CONFIG"]
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--pipeline", "training", "--config", config, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary_of(result):
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def first_run(stores):
    home, env = stores
    result = run_cli(env, "--summary", str(home / "summary.json"))
    summary = summary_of(result)
    assert json.loads((home / "summary.json").read_text()) == summary
    return summary, result


def mlflow_client(env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def test_summary(first_run):
    summary, result = first_run
    # stdout is the summary line alone; progress and third-party output go to stderr, without the noise.
    assert len(result.stdout.splitlines()) == 1 and json.loads(result.stdout) == summary
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", result.stderr)  # ZenML's console handler colours parts of lines
    assert "embedded S3 at http://127.0.0.1" in stderr
    assert 'HTTP/1.1" 200' not in stderr and "Found credentials" not in stderr
    # TensorFlow's import banner, Keras' own epoch lines and MLflow's table creation are off at the default level;
    # the project's own epoch line stays.
    for noise in (
        "oneDNN",
        "absl::InitializeLog",
        "Epoch 1/1",
        "/step - ",
        "Creating initial MLflow database tables",
        "Failed to disable MLflow autologging",
        "shuffle=True",
    ):
        assert noise not in stderr, noise
    assert re.search(r"^.*epoch 1/1: loss=\S+ auc=\S+ val_loss=\S+ val_auc=", stderr, re.M)
    assert summary["steps"] == {name: "completed" for name in STEPS}
    assert summary["promoted"] is True and summary["model_version"] == "1"
    assert summary["splits"]["test"] == {"NORMAL": 23, "PNEUMONIA": 24}
    train_val = sum(summary["splits"][s][c] for s in ("train", "val") for c in ("NORMAL", "PNEUMONIA"))
    assert train_val + summary["splits"]["duplicates_removed"] + summary["splits"]["quarantined"] == 194
    assert len(summary["dataset_sha256"]) == 64
    assert {"test_auc", "test_accuracy", "test_sensitivity", "test_specificity", "val_auc"} <= summary["metrics"].keys()
    assert 0 < summary["threshold"] < 1


def test_mlflow_has_params_curves_metrics_and_plots(first_run, stores):
    summary, _ = first_run
    client = mlflow_client(stores[1])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.experiment_id == client.get_experiment_by_name("chest-xray-training").experiment_id
    params = run.data.params
    assert params["train.batch_size"] == "16" and params["model.image_size"] == "64"
    assert params["dataset.sha256"] == summary["dataset_sha256"]
    assert params["dataset.source_uri"] == "s3://chest-xray/chest_xray.zip"
    assert run.data.metrics["test_auc"] == pytest.approx(summary["metrics"]["test_auc"])
    assert len(client.get_metric_history(run.info.run_id, "epoch_val_auc")) == 1
    artifacts = {a.path for folder in ("plots", "data") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {
        "plots/roc_pr_curves.png",
        "plots/confusion_matrix.png",
        "plots/calibration.png",
        "plots/training_curves.png",
        "data/class_distribution.png",
        "data/sample_grid.png",
    } <= artifacts
    version = client.get_model_version("chest-xray-classifier", "1")
    assert version.tags["promotion_decision"] == "promoted"
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == "1"


def test_champion_reload_reproduces_test_auc(first_run, stores):
    """scripts/verify_registered.py: a reload through the registry, test images decoded straight from the zip."""
    summary, _ = first_run
    home, env = stores
    report_path = home / "verify.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "verify_registered.py"),
            "--summary",
            str(home / "summary.json"),
            "--version",
            "champion",
            "--archive",
            str(MINI_ZIP),
            "--output",
            str(report_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads(report_path.read_text())
    assert report["n"] == 47 and report["version"] == summary["model_version"]
    assert report["threshold"] == pytest.approx(summary["threshold"])
    assert report["auc"] == pytest.approx(summary["metrics"]["test_auc"], abs=0.005)
    assert report["ci95_at_0_5"]["accuracy"][0] <= report["at_0_5"]["accuracy"] <= report["ci95_at_0_5"]["accuracy"][1]


def test_verify_refuses_a_different_archive(first_run, stores, tmp_path):
    home, env = stores
    other = tmp_path / "other.zip"
    _zip(other, dataset_entries())
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "verify_registered.py"),
            "--summary",
            str(home / "summary.json"),
            "--archive",
            str(other),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1 and "is not the archive this version was trained on" in result.stderr


def test_identical_rerun_is_cached_by_content(first_run, stores):
    _, env = stores
    summary = summary_of(run_cli(env))
    assert summary["steps"]["ingest_from_s3"] == "completed"  # always re-reads the object
    assert all(summary["steps"][name] == "cached" for name in STEPS[1:])
    assert summary["model_version"] == first_run[0]["model_version"]


def _zip(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        return path


def _bomb(path):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in dataset_entries().items():
            archive.writestr(name, data)
        with archive.open("chest_xray/train/NORMAL/IM-0999-0001.jpeg", "w", force_zip64=True) as entry:
            for _ in range(1024):
                entry.write(bytes(1 << 20))
    return path


def _truncated(path):
    whole = _zip(path, dataset_entries(per_class=10))
    path.write_bytes(whole.read_bytes()[: path.stat().st_size // 2])
    return path


BAD_ARCHIVES = {
    "traversal": (
        lambda p: _zip(p, dataset_entries() | {"chest_xray/../../escape.jpeg": b"x"}),
        "unsafe archive: path traversal in entry 'chest_xray/../../escape.jpeg'",
    ),
    "zip_bomb": (
        _bomb,
        "entry 'chest_xray/train/NORMAL/IM-0999-0001.jpeg' declares 1073741824 bytes, over max_entry_bytes",
    ),
    "empty_zip": (lambda p: _zip(p, {}), "is an empty zip archive: no entries"),
    "truncated": (_truncated, "is not a readable zip archive"),
    "no_test_split": (lambda p: _zip(p, dataset_entries(splits=("train",))), "no folder with both train/ and test/"),
    "bad_images": (
        lambda p: _zip(
            p, dataset_entries(per_class=5) | {f"chest_xray/train/NORMAL/IM-{i}-1.jpeg": b"" for i in range(900, 903)}
        ),
        "3 of 23 images failed to decode",
    ),
}


# End to end: one case per failure class (unsafe entry, size limits, unreadable, empty, layout, image quality). The
# other archive cases (absolute path, symlink, not a zip, unknown or empty class) are unit-tested in test_archive.py.
@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archive_fails_in_one_line_and_registers_nothing(first_run, stores, tmp_path, case):
    _, env = stores
    build, message = BAD_ARCHIVES[case]
    bad = build(tmp_path / f"{case}.zip")
    before = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    result = run_cli(env, "--dataset-uri", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    after = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    assert [v.version for v in after] == [v.version for v in before]
    champion = mlflow_client(env).get_model_version_by_alias("chest-xray-classifier", "champion")
    assert str(champion.version) == "1"
    # The failed pipeline's MLflow run (opened by the ingest step) ends FAILED, with the step and the error as tags.
    client = mlflow_client(env)
    experiment = client.get_experiment_by_name("chest-xray-training")
    latest = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    assert latest.info.status == "FAILED" and latest.data.tags["failed_step"] == "unzip_and_validate"
    assert message in latest.data.tags["error"]


@pytest.mark.parametrize(
    "uri, reason",
    [("s3://no-such-bucket/x.zip", "bucket does not exist"), ("s3://chest-xray/missing.zip", "object does not exist")],
)
def test_s3_failures_end_in_one_line_and_register_nothing(first_run, stores, uri, reason):
    _, env = stores
    before = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    with EmbeddedS3():
        make_client(1).create_bucket(Bucket="chest-xray")
        aws = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        result = run_cli(env | aws, "--dataset-uri", uri)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot read {uri}: {reason}"
    after = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    assert [v.version for v in after] == [v.version for v in before]


def _variant(env, tmp_path, section, **changes):
    return {**env, "XRAY_TEST_CONFIG": str(deterministic_smoke_config(tmp_path / "variant.yaml", **{section: changes}))}


def test_failed_training_leaves_the_registry_untouched(first_run, stores, tmp_path):
    env = _variant(stores[1], tmp_path, "model", weights=str(tmp_path / "missing.weights.h5"))
    before = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    result = run_cli(env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: model.weights: weights file not found: {tmp_path / 'missing.weights.h5'}"
    )
    after = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    assert sorted(v.version for v in after) == sorted(v.version for v in before)


def test_failed_gate_registers_a_version_but_keeps_the_champion(first_run, stores, tmp_path):
    env = _variant(stores[1], tmp_path, "evaluate", fixed_threshold=0.999)
    client = mlflow_client(env)
    champion = client.get_model_version_by_alias("chest-xray-classifier", "champion")
    summary = summary_of(run_cli(env))
    assert summary["promoted"] is False
    rejected = client.get_model_version("chest-xray-classifier", summary["model_version"])
    assert rejected.tags["promotion_decision"] == "rejected"
    assert "min_sensitivity" in rejected.tags["promotion_reason"]
    now = client.get_model_version_by_alias("chest-xray-classifier", "champion")
    assert (now.version, now.run_id, now.tags) == (champion.version, champion.run_id, champion.tags)


def _labelled_site(folder, prefix="chest_xray/test/"):
    """A site folder from the mini archive's test split, its class folders two levels down and lower-cased."""
    with zipfile.ZipFile(MINI_ZIP) as archive:
        for name in archive.namelist():
            if name.startswith(prefix) and name.endswith(".jpeg"):
                label, file = name.split("/")[-2:]
                target = folder / "hospital" / "2026" / label.lower() / file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    return folder


def test_a_sensitive_challenger_is_gated_on_paired_scores_against_the_champion(first_run, stores, tmp_path):
    site = _labelled_site(tmp_path / "site-b")
    env = {
        **stores[1],
        "XRAY_TEST_CONFIG": str(
            deterministic_smoke_config(
                tmp_path / "gated.yaml",
                registry={"gate_sites": [str(site)], "margin": 0.01},
                train={"learning_rate": 0.002},
            )
        ),
    }
    client = mlflow_client(env)
    champion = str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version)
    summary = summary_of(run_cli(env))
    version = client.get_model_version("chest-xray-classifier", summary["model_version"])
    tags = version.tags
    assert tags["gate.champion_version"] == str(champion) and tags["gate.margin"] == "0.01"
    for image_set, images in (("test", 47), ("site:site-b", 47)):
        assert tags[f"gate.{image_set}.images"] == str(images)
        low, high = (
            float(tags[f"gate.{image_set}.auc_difference_ci_low"]),
            float(tags[f"gate.{image_set}.auc_difference_ci_high"]),
        )
        assert low <= float(tags[f"gate.{image_set}.auc_difference"]) <= high
    non_inferior = all(float(tags[f"gate.{s}.auc_difference_ci_low"]) >= -0.01 for s in ("test", "site:site-b"))
    assert summary["promoted"] is non_inferior and tags["promotion_decision"] == (
        "promoted" if non_inferior else "rejected"
    )
    assert f"champion v{champion}" in tags["promotion_reason"]
    now = str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version)
    assert now == (summary["model_version"] if non_inferior else champion)
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    card = open(
        mlflow.artifacts.download_artifacts(
            f"models:/chest-xray-classifier/{version.version}/model_card.md", dst_path=str(tmp_path / "card")
        )
    ).read()
    assert "## Promotion gate" in card and "| site:site-b | 47 |" in card and "## Results by site" in card


def test_bad_config_is_rejected_before_any_step(stores, tmp_path):
    _, env = stores
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  batch_size: -4\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: invalid config {config}: train.batch_size: Input should be greater than or equal to 1"
    )
