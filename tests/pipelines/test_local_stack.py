"""The default local stack (xray-local) end to end, on one shared run (conftest.local: the smoke config on
chest_xray_mini.zip, read from an s3:// URI with sentinel credentials): its summary, MLflow records and secrets;
the variations that need a pipeline around them (caching, the gate against a champion, one failure of each class);
and monitoring a shifted batch read from S3 with the model afterwards.

Isolated stores: a temporary ZENML_CONFIG_PATH and a temporary SQLite MLflow. The tests run in file order, on one
worker under `make test` (--dist loadfile), and later ones see the versions earlier ones registered.
"""

import io
import json
import re
import zipfile

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stacks import LOCAL_SOURCE, SENTINEL_ACCESS_KEY, SENTINEL_SECRET, champion_probabilities, s3_client
from steps import __all__ as training_steps
from support import FULL_ZIP, MINI_ZIP, ROOT, dataset_entries, free_port, isolated_env, require, run_command

pytestmark = pytest.mark.slow
STEPS = list(training_steps)  # the training pipeline's steps, in order


@pytest.fixture(scope="module")
def stores(local):
    return local.home, local.env


@pytest.fixture(scope="module")
def first_run(local):
    summary = local.summary
    assert json.loads((local.home / "summary.json").read_text()) == summary
    return summary, local.result


def run_cli(env, *args, timeout=900):
    return run_command(
        [ROOT / "run.py", "--pipeline", "training", "--config", env["XRAY_TEST_CONFIG"], *args], env, timeout
    )


def summary_of(result):
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def mlflow_client(env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def test_summary(first_run):
    summary, result = first_run
    # stdout is the summary line alone; progress and third-party output go to stderr, without the noise.
    assert len(result.stdout.splitlines()) == 1 and json.loads(result.stdout) == summary
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", result.stderr)  # ZenML's console handler colours parts of lines
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
    assert params["dataset.source_uri"] == LOCAL_SOURCE
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
    # Change control (#45): the smoke config's plan; the first version's impact report in its run, linked from its
    # card; the trail holds the plan version, the gate's decision and the registration, and verifies.
    link = run.data.tags["impact_report"]
    assert link == f"runs:/{run.info.run_id}/impact/impact_report.md"
    assert {"impact/impact_report.md", "impact/impact_report.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "impact")
    }
    import mlflow

    mlflow.set_tracking_uri(stores[1]["MLFLOW_TRACKING_URI"])
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/impact/impact_report.json"))
    assert report["model_version"] == "1" and report["plan_version"] == 1 and report["decision"] == "promoted"
    assert "# Impact report: chest-xray-classifier v1" in mlflow.artifacts.load_text(link)
    card = mlflow.artifacts.load_text("models:/chest-xray-classifier/1/model_card.md")
    assert "### Change control" in card and f"`{link}`" in card
    assert json.loads(version.tags["change_control"])["plan_version"] == 1

    def audit(*args):
        return run_command([ROOT / "run.py", "audit", *args, "--config", stores[1]["XRAY_TEST_CONFIG"]], stores[1], 300)

    verified = audit("verify")
    assert verified.returncode == 0 and json.loads(verified.stdout)["intact"], verified.stderr[-2000:]
    shown = json.loads(audit("show", "--json").stdout)
    assert [r["what"] for r in shown["records"]] == ["plan version", "gate decision", "registration"]
    assert shown["records"][2]["details"]["model_version"] == "1" and len(shown["files"]) == 3
    assert all("/audit/record-" in path for path in shown["files"])


def test_the_sentinel_secret_appears_nowhere(first_run, stores):
    """Credentials never reach configs, logs, MLflow, ZenML metadata or the summary: every output stream and every
    file of both stores (SQLite databases and artifacts included) is searched for them."""
    summary, result = first_run
    home, _ = stores
    for stream in (result.stdout, result.stderr):
        assert SENTINEL_SECRET not in stream and SENTINEL_ACCESS_KEY not in stream
    searched = 0
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            searched += 1
            assert SENTINEL_SECRET.encode() not in data, f"secret found in {path}"
            assert SENTINEL_ACCESS_KEY.encode() not in data, f"access key id found in {path}"
    assert searched > 10  # both stores, databases and artifacts, were really searched
    assert any(p.suffix == ".db" for p in home.rglob("*")) and summary["model_version"] == "1"


def _verify(env, home, *args):
    """scripts/verify_registered.py on the local run's summary."""
    return run_command([ROOT / "scripts" / "verify_registered.py", "--summary", home / "summary.json", *args], env, 600)


def test_champion_reload_reproduces_test_auc(first_run, stores):
    """scripts/verify_registered.py: a reload through the registry, test images decoded straight from the zip."""
    summary, _ = first_run
    home, env = stores
    report_path = home / "verify.json"
    result = _verify(env, home, "--version", "champion", "--archive", str(MINI_ZIP), "--output", str(report_path))
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
    result = _verify(env, home, "--archive", str(other))
    assert result.returncode == 1 and "is not the archive this version was trained on" in result.stderr


def test_identical_rerun_is_cached_by_content(first_run, stores):
    _, env = stores
    summary = summary_of(run_cli(env))
    # always look at the objects again
    assert summary["steps"]["locate_archive"] == summary["steps"]["locate_sources"] == "completed"
    # The same object: its archive is not downloaded or stored again, and nothing downstream reruns.
    assert all(summary["steps"][name] == "cached" for name in STEPS if not name.startswith("locate_")), summary["steps"]
    assert summary["model_version"] == first_run[0]["model_version"]


def _zip(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        return path


# End to end: an unsafe archive is refused in one line, with nothing registered and the MLflow run FAILED. Every other
# archive case (absolute path, symlink, zip bomb, duplicate entry names, total and count limits, not a zip, empty,
# truncated, layout, unknown or empty class, too many images that do not decode) fails in the same step through the
# same error types: tests/xray/storage/test_archive.py, test_manifest.py and test_dataset.py; S3 failures (missing bucket or
# object, denied, unreachable, throttled) raise the same one-line error type in ingest: test_s3.py, test_s3_retry.py.
def test_an_unsafe_archive_fails_in_one_line_and_registers_nothing(first_run, stores, tmp_path):
    _, env = stores
    message = "unsafe archive: path traversal in entry 'chest_xray/../../escape.jpeg'"
    bad = _zip(tmp_path / "traversal.zip", dataset_entries() | {"chest_xray/../../escape.jpeg": b"x"})
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


def _variant(env, path, **section_changes):
    """The module's config with some sections changed, as the environment of a run."""
    raw = yaml.safe_load(open(env["XRAY_TEST_CONFIG"]))
    for section, changes in section_changes.items():
        raw[section] = raw.get(section, {}) | changes
    path.write_text(yaml.safe_dump(raw))
    return {**env, "XRAY_TEST_CONFIG": str(path)}


def test_failed_training_leaves_the_registry_untouched(first_run, stores, tmp_path):
    env = _variant(stores[1], tmp_path / "variant.yaml", model={"weights": str(tmp_path / "missing.weights.h5")})
    before = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    result = run_cli(env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: model.weights: weights file not found: {tmp_path / 'missing.weights.h5'}"
    )
    after = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    assert sorted(v.version for v in after) == sorted(v.version for v in before)


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


def test_a_challenger_is_gated_on_paired_scores_against_the_champion(first_run, stores, tmp_path):
    site = _labelled_site(tmp_path / "site-b")
    env = _variant(stores[1], tmp_path / "gated.yaml", registry={"gate_sites": [str(site)], "margin": 0.01})
    client = mlflow_client(env)
    champion = str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version)
    summary = summary_of(run_cli(env))
    # Only registration settings changed: the trained model and its evaluation come from the cache, and the
    # challenger (the same weights, registered again) is compared with the champion on paired scores.
    assert summary["steps"]["train_model"] == "cached" and summary["steps"]["register_and_promote"] == "completed"
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


def _second_site(folder, per_class=90):
    """A labelled folder of training images of the full archive that the mini archive does not hold (so none is a
    duplicate of the base source), NORMAL/ and PNEUMONIA/ two levels down."""
    with zipfile.ZipFile(MINI_ZIP) as mini:
        held = {name.rsplit("/", 1)[-1] for name in mini.namelist()}
    with zipfile.ZipFile(require(FULL_ZIP)) as archive:
        for label in ("NORMAL", "PNEUMONIA"):
            names = sorted(
                n
                for n in archive.namelist()
                if f"/train/{label}/" in n and n.endswith(".jpeg") and n.rsplit("/", 1)[-1] not in held
            )[-per_class:]
            for name in names:
                target = folder / "export" / label / name.rsplit("/", 1)[-1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    return folder


@pytest.fixture(scope="module")
def two_sources(stores, tmp_path_factory):
    """The module's config with a second labelled source (site b), as (site folder, environment). A wide margin and a
    low floor: the smoke model is near chance, and what is under test (lineage, the skip, approval) needs the
    two-source version to become champion."""
    home = tmp_path_factory.mktemp("two-sources")
    site = _second_site(home / "site-b")
    plan = yaml.safe_load(open(stores[1]["XRAY_TEST_CONFIG"]))["change_plan"]
    # Change plan v2: site b listed, the lower floor within the operating point's bounds, the wide margins; a new
    # plan version governs once the reviewer approved it (no accounts on this stack: --reviewer names who).
    plan |= {"version": 2, "sites": ["guangzhou", "b"]}
    plan["operating_point"]["evaluate.min_sensitivity"] = {"low": 0.5, "high": 0.99}
    plan["criteria"] |= {"min_sensitivity": 0.5, "margin": 0.49, "site_margin": 0.49, "subgroup_margin": 0.49}
    env = _variant(
        stores[1],
        home / "two-sources.yaml",
        data={"sources": [{"site": "guangzhou"}, {"site": "b", "uri": str(site)}], "max_eval_per_class": 40},
        registry={"margin": 0.49},
        evaluate={"min_sensitivity": 0.5, "min_recalibration_per_class": 8},
        change_plan=plan,
    )
    approval = [
        "audit",
        "approve-plan",
        "--reviewer",
        "Dr. R",
        "--reason",
        "site b",
        "--config",
        env["XRAY_TEST_CONFIG"],
    ]
    summary_of(run_command([ROOT / "run.py", *approval], env, 300))
    return site, env


def test_two_sources_train_together_with_lineage_and_an_unchanged_retraining_is_skipped(
    first_run, two_sources, tmp_path, monkeypatch, caplog
):
    import shutil
    import time

    site, env = two_sources
    started = time.perf_counter()
    summary = summary_of(run_cli(env))
    trained_s = time.perf_counter() - started
    assert summary["promoted"], summary["promotion_reason"]
    sites = summary["sites"]
    assert set(sites) == {"guangzhou", "b"} and sites["b"]["source"] == str(site)
    assert sum(sum(c.values()) for c in sites["b"]["splits"].values()) == 180
    assert all(sum(sites["b"]["splits"][split].values()) > 0 for split in ("train", "val", "test"))
    for name in ("guangzhou", "b"):
        metrics = sites[name]["metrics"]
        assert metrics["auc_ci_low"] <= metrics["auc"] <= metrics["auc_ci_high"] and metrics["images"] > 0
    client = mlflow_client(env)
    run = client.get_run(summary["mlflow_run_id"])
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"guangzhou", "b"}
    assert {t.key: t.value for t in inputs["b"].tags}["mlflow.data.context"] == "training"
    assert json.loads({t.key: t.value for t in inputs["b"].tags}["counts"]) == sites["b"]["splits"]
    version = client.get_model_version("chest-xray-classifier", summary["model_version"])
    assert "gate.test:b.images" in version.tags and "gate.test:guangzhou.images" in version.tags
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    card = open(
        mlflow.artifacts.download_artifacts(
            f"models:/chest-xray-classifier/{version.version}/model_card.md", dst_path=str(tmp_path / "card")
        )
    ).read()
    assert "## Training sources" in card and f"| b | `{site}` |" in card and "## Results per site" in card

    versions = len(client.search_model_versions("name='chest-xray-classifier'"))
    started = time.perf_counter()
    skipped = summary_of(run_cli(env, "--if-changed"))
    skipped_s = time.perf_counter() - started
    assert skipped["skipped"] == f"no new data since version {summary['model_version']}"
    assert len(client.search_model_versions("name='chest-xray-classifier'")) == versions
    assert (
        str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == summary["model_version"]
    )
    # Skipped before any step ran: no pipeline run, no new version (the time is printed, never asserted).
    assert "pipeline_run_id" not in skipped
    print(f"two-source smoke training {trained_s:.1f} s; --if-changed with no new data {skipped_s:.1f} s")

    # One new image at site b: the check says so and trains (called in this process, to spare a third training).
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, env[key])
    from pipelines.training import unchanged_since
    from xray.config_file import load_config

    config = load_config(env["XRAY_TEST_CONFIG"])
    config = config.model_copy(
        update={"registry": config.registry.model_copy(update={"tracking_uri": env["MLFLOW_TRACKING_URI"]})}
    )
    assert unchanged_since(config, None)["model_version"] == summary["model_version"]
    # The same images elsewhere are the same data (the digest is of content); one image more is not. A copy, so
    # that the site stays as the champion saw it for the next test.
    grown = shutil.copytree(site, tmp_path / "site-b-grown")
    with zipfile.ZipFile(MINI_ZIP) as mini:
        image = mini.read(next(n for n in mini.namelist() if n.endswith(".jpeg")))
    moved = config.data.model_copy(
        update={"sources": (config.data.sources[0], config.data.sources[1].model_copy(update={"uri": str(grown)}))}
    )
    assert unchanged_since(config.model_copy(update={"data": moved}), None) is not None
    (grown / "export" / "NORMAL" / "new-study.jpeg").write_bytes(image)
    with caplog.at_level("INFO", logger="pipelines.launch"):
        assert unchanged_since(config.model_copy(update={"data": moved}), None) is None
    assert "changed: b" in caplog.text


def test_a_required_approval_waits_for_a_person_and_a_rollback_restores_the_champion(two_sources, tmp_path):
    # The champion's own config (the two-source run above) with approval required: the same model from the cache,
    # so the gate's paired difference is exactly zero and the version waits for a person.
    env = _variant(two_sources[1], tmp_path / "approval.yaml", registry={"require_approval": True})
    client = mlflow_client(env)
    champion = str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version)
    summary = summary_of(run_cli(env))  # only registration settings changed: training comes from the cache
    version = summary["model_version"]
    assert summary["steps"]["train_model"] == "cached" and not summary["promoted"], summary
    assert "pending approval" in summary["promotion_reason"]
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == champion
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "candidate").version) == version

    def decide(*args):
        return run_command([ROOT / "run.py", "--config", env["XRAY_TEST_CONFIG"], *args], env, 300)

    approved = summary_of(decide("approve", "--model-version", version, "--reviewer", "Dr. Q", "--reason", "read 40"))
    assert approved["previous_champion"] == champion and approved["zenml_stage"] == "production"
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == version
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    card = mlflow.artifacts.load_text(f"models:/chest-xray-classifier/{version}/model_card.md")
    assert f"approved by Dr. Q: read 40 (champion was v{champion})" in card
    again = decide("approve", "--model-version", version, "--reviewer", "Dr. Q", "--reason", "again")
    assert (
        again.returncode == 2 and f"error: v{version} is not pending approval" in again.stderr.strip().splitlines()[-1]
    )
    rolled = summary_of(decide("rollback", "--to", champion, "--reviewer", "on-call", "--reason", "alarms"))
    assert rolled["previous_champion"] == version and rolled["zenml_stage"] == "production"
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == champion
    assert "replaced as champion by v" + champion in mlflow.artifacts.load_text(
        f"models:/chest-xray-classifier/{version}/model_card.md"
    )


def test_bad_config_is_rejected_before_any_step(tmp_path):
    env = isolated_env(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  batch_size: -4\n")
    result = run_command([ROOT / "run.py", "--config", config], env, 300)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: invalid config {config}: train.batch_size: Input should be greater than or equal to 1"
    )


def _monitor(env, *args):
    return run_command([ROOT / "run.py", "--pipeline", "monitoring", *args], env, 600)


def _registry_state(env):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    return sorted(
        (v.version, v.current_stage, tuple(sorted(v.tags.items())), tuple(sorted(v.aliases)))
        for v in client.search_model_versions("name='chest-xray-classifier'")
    )


def test_monitoring_a_shifted_batch_on_s3_reports_drift_and_never_touches_the_registry(local, tmp_path):
    """Inverted radiographs under an s3:// prefix, with --fail-on-drift: the report, plots and predictions are written
    and logged, the summary says drift, the exit code is 3, and the registry is exactly as before."""
    from mlflow.tracking import MlflowClient

    env = local.env
    client = s3_client(env)
    client.create_bucket(Bucket="incoming")
    shifted = tmp_path / "inverted"
    shifted.mkdir()
    for path in sorted(local.images.glob("*.jpeg")):
        Image.fromarray(255 - np.asarray(Image.open(path).convert("RGB"))).save(shifted / path.name)
        client.upload_file(str(shifted / path.name), "incoming", f"batch-7/{path.name}")
    registry = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    champion = str(registry.get_model_version_by_alias("chest-xray-classifier", "champion").version)
    before = _registry_state(env)
    result = _monitor(
        env, "--images", "s3://incoming/batch-7/", "--output", str(tmp_path / "report"), "--fail-on-drift"
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: drift detected: ")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"drift_detected", "p_value", "ood_fraction", "images"} <= summary.keys()
    assert summary["images"] == summary["readable"] == 20 and summary["model_version"] == champion
    assert summary["drift_detected"] is True and summary["p_value"] < 0.01 and summary["ood_fraction"] > 0.5
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"report.html", "report.json", "predictions.csv", "ood_scores.png", "acquisition.png"} <= written
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["ood_fraction"] == summary["ood_fraction"] and report["embedding"]["reference_images"] > 0
    # The batch was read through S3, and scored as the registered champion scores those files.
    table = pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert len(table) == 20 and table["path"].str.startswith("s3://incoming/batch-7/").all()
    files = [shifted / p.rsplit("/", 1)[1] for p in table["path"]]
    np.testing.assert_allclose(table["probability"], champion_probabilities(env, files), atol=1e-5)
    experiment = registry.get_experiment_by_name("chest-xray-monitoring")
    run = registry.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    assert run.data.metrics["ood_fraction"] == pytest.approx(summary["ood_fraction"])
    assert {a.path for a in registry.list_artifacts(run.info.run_id, "monitoring")} >= {
        "monitoring/report.html",
        "monitoring/report.json",
        "monitoring/ood_scores.png",
    }
    assert _registry_state(env) == before


# -- DICOM: the hospital's own files through every entry point, and no patient data in any store ----------------


def _dicom_copies(images: list, folder, sentinels: bool = True) -> dict:
    """A DICOM of each JPEG, the encodings in turn (every third without an extension, every fourth MONOCHROME1);
    returns {DICOM file: its JPEG}."""
    from fixtures.dicom_factory import SYNTAXES, radiograph

    syntaxes = sorted(SYNTAXES)
    made = {}
    for index, path in enumerate(images):
        syntax = syntaxes[index % len(syntaxes)]
        bits = 8 if syntax == "jpeg-baseline" else (12, 16)[index % 2]
        photometric = "MONOCHROME1" if index % 4 == 3 else "MONOCHROME2"
        name = f"{path.stem}-{syntax}" + ("" if index % 3 == 0 else ".dcm")
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(
            radiograph(
                path.read_bytes(),
                bits=bits,
                syntax=syntax,
                photometric=photometric,
                sentinels=sentinels,
                PatientID=f"ZZSENTINELPID77-{index}" if sentinels else f"P{index}",
            )
        )
        made[target] = path
    return made


def _assert_no_sentinel(home, *streams):
    from fixtures.dicom_factory import SENTINELS

    parts = {part for value in SENTINELS.values() for part in [value, *value.split("^")]}
    for stream in streams:
        assert not [part for part in parts if part in stream], "a sentinel in an output stream"
    searched = 0
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".parquet":  # compressed columns (the prediction log, ZenML's tables): their values
                data += pd.read_parquet(path).to_csv(index=False).encode()
            searched += 1
            assert not [part for part in parts if part.encode() in data], f"a sentinel in {path}"
    assert searched > 10


def _prediction_log(home) -> tuple:
    """The local stack's prediction log (<artifact store>/prediction_log): its root and every row in it."""
    from xray.monitoring.prediction_log import read_log

    parts = sorted(home.rglob("prediction_log/date=*/*.parquet"))
    assert parts, "batch inference logs every prediction in the artifact store"
    root = parts[0].parents[1]
    return root, read_log(str(root))


def test_dicom_batches_mix_with_jpeg_are_scoped_and_leak_no_patient_data(local, tmp_path):
    """A folder of the twenty JPEGs, a DICOM of each in every encoding (some without an extension), and adult,
    lateral, CT, non-chest and broken DICOMs, every identifying tag planted with a sentinel: one row per file, each
    DICOM within 0.02 of its JPEG, the wrong ones out of scope or unreadable with a reason, exit 0 for inference and
    monitoring; then no sentinel in any output stream, file or store (ZenML, MLflow, the run's outputs)."""
    from pydicom.data import get_testdata_file

    from fixtures.dicom_factory import radiograph, with_sentinels

    env = local.env
    folder = tmp_path / "hospital-batch"  # the inputs hold the sentinels; every store and output is under home
    jpegs = sorted(local.images.glob("*.jpeg"))
    for path in jpegs:
        (folder / "jpeg").mkdir(parents=True, exist_ok=True)
        (folder / "jpeg" / path.name).write_bytes(path.read_bytes())
    made = _dicom_copies(jpegs, folder / "pacs" / "export")
    first = jpegs[0].read_bytes()
    wrong = {
        "adult.dcm": (radiograph(first, sentinels=True, age="045Y"), "PatientAge 045Y outside the validated 1-5 years"),
        "lateral": (radiograph(first, sentinels=True, view="LL"), "ViewPosition LL outside the validated PA, AP"),
        "ct.dcm": (with_sentinels(get_testdata_file("CT_small.dcm")), "Modality CT outside the validated CR, DX"),
        "hand.dcm": (radiograph(first, sentinels=True, body_part="HAND"), "BodyPartExamined HAND outside"),
        "broken.dcm": (radiograph(first, sentinels=True)[:-4000], "cannot decode DICOM"),
    }
    for name, (data, _) in wrong.items():
        (folder / "wrong" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "wrong" / name).write_bytes(data)
    output = local.home / "hospital-out"
    inference = run_command(
        [
            ROOT / "run.py",
            "--pipeline",
            "inference",
            "--images",
            folder,
            "--output",
            output / "preds.csv",
            "--explain",
            "2",
        ],
        env,
        900,
    )
    summary = summary_of(inference)
    table = pd.read_csv(output / "preds.csv", keep_default_na=False)
    assert len(table) == 20 + len(made) + len(wrong) == summary["rows_written"]
    by_path = table.set_index("path")
    for dicom_file, jpeg in made.items():
        row, original = by_path.loc[str(dicom_file)], by_path.loc[str(folder / "jpeg" / jpeg.name)]
        assert abs(float(row["probability"]) - float(original["probability"])) <= 0.02, dicom_file.name
        assert row["sop_instance_uid"].startswith("1.2.") and original["sop_instance_uid"] == ""
    for name, (_, reason) in wrong.items():
        row = by_path.loc[str(folder / "wrong" / name)]
        expected = "unreadable" if name == "broken.dcm" else "out_of_scope"
        assert row["status"] == expected and row["reason"].startswith(reason) and row["label"] == "", name
    assert summary["out_of_scope"] == 4 and summary["unreadable"] == 1
    monitoring = _monitor(env, "--images", str(folder), "--output", str(local.home / "hospital-report"))
    assert monitoring.returncode == 0, monitoring.stderr[-3000:]
    _, log = _prediction_log(local.home)
    logged = log[log["input"] == str(folder)]
    assert len(logged) == len(table) == summary["prediction_log_rows"]
    assert set(logged["sop_instance_uid"]) >= set(table["sop_instance_uid"]) and (logged["source"] == "batch").all()
    _assert_no_sentinel(local.home, inference.stdout, inference.stderr, monitoring.stdout, monitoring.stderr)


def test_a_dicom_site_is_evaluated_like_its_jpegs(local, tmp_path):
    """The mini archive's 47 test images as DICOM under NORMAL/ and PNEUMONIA/ at some depth, every encoding, some
    without an extension: --pipeline evaluation reads them all, and the AUC is the JPEGs' AUC."""
    from sklearn.metrics import roc_auc_score

    env = local.env
    jpegs = tmp_path / "jpegs"
    with zipfile.ZipFile(MINI_ZIP) as archive:
        for name in archive.namelist():
            if name.startswith("chest_xray/test/") and name.endswith(".jpeg"):
                target = jpegs / name.split("/")[-2] / name.rsplit("/", 1)[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    champion = str(mlflow_client(env).get_model_version_by_alias("chest-xray-classifier", "champion").version)
    site = tmp_path / "site"
    made = {}
    for label in ("NORMAL", "PNEUMONIA"):
        made |= _dicom_copies(sorted((jpegs / label).iterdir()), site / "dicom" / "2026" / label, sentinels=False)
    result = run_command(
        [
            ROOT / "run.py",
            "--pipeline",
            "evaluation",
            "--model-version",
            champion,
            "--config",
            local.config,
            "--dataset-uri",
            site,
            "--site",
            "dicom-site",
        ],
        env,
        900,
    )
    summary = summary_of(result)
    assert summary["images"] == 47 == len(made) and summary["model_version"] == champion
    paths = sorted(made.values())
    labels = [int(p.parent.name == "PNEUMONIA") for p in paths]
    # The JPEGs through the registered model (no calibration refit: the evaluation reports the version as registered).
    expected = roc_auc_score(labels, champion_probabilities(env, paths))
    assert summary["metrics"]["auc"] == pytest.approx(expected, abs=0.02)


@pytest.fixture(scope="module")
def pacs_e2e(local, tmp_path_factory):
    """make pacs's Orthanc on its own port and storage, for the inference pipeline's write-back (both tests below):
    the PACS and the run's environment with its credentials (also in this process's, for the test's own client)."""
    import os

    from test_pacs import PASSWORD

    from infra.pacs import Pacs
    from xray.storage import dicomweb

    pacs = Pacs(state=tmp_path_factory.mktemp("pacs-e2e"), port=free_port(), password=PASSWORD)
    env = local.env | {dicomweb.USER_ENV: pacs.user, dicomweb.PASSWORD_ENV: PASSWORD}
    saved = {key: os.environ.get(key) for key in (dicomweb.USER_ENV, dicomweb.PASSWORD_ENV)}
    os.environ.update({dicomweb.USER_ENV: pacs.user, dicomweb.PASSWORD_ENV: PASSWORD})
    try:
        pacs.up(die_with_parent=True)
        yield pacs, env
    finally:
        pacs.down()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_inference_reads_a_pacs_and_writes_one_report_per_image_back(local, pacs_e2e):
    """A mix of studies stowed, one `--pipeline inference --images dicomweb://... --write-back` leaves exactly one SR
    per analysed image, the same command with `--resume` adds none, and neither the PACS password nor an identifying
    value of the images (stow_mix plants sentinels) appears in any output stream, file or store (ZenML, MLflow, the
    predictions). It lists the whole PACS: it runs first of the two."""
    from test_pacs import PASSWORD, reports_in, stow_mix

    from xray.storage import dicomweb

    pacs, env = pacs_e2e
    made = stow_mix(pacs)
    output = local.home / "pacs-out" / "preds.csv"
    command = [ROOT / "run.py", "--pipeline", "inference", "--images", pacs.dicomweb, "--output", output]
    first = run_command([*command, "--write-back"], env, 900)
    summary = summary_of(first)
    analysed = len(made) - 1  # the structured report is skipped
    assert summary["rows_written"] == analysed and summary["reports_written"] == analysed
    assert summary["skipped"] == {dicomweb.NOT_AN_IMAGE: 1}
    assert len(reports_in(pacs)) == analysed
    again = summary_of(run_command([*command, "--write-back", "--resume"], env, 900))
    assert again["reports_written"] == 0 and len(reports_in(pacs)) == analysed
    for stream in (first.stdout, first.stderr):
        assert PASSWORD not in stream
    for path in local.home.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), f"the PACS password in {path}"
    _assert_no_sentinel(local.home, first.stdout, first.stderr)


def test_inference_with_heatmaps_writes_each_ok_image_its_heatmaps_and_resume_adds_nothing(local, pacs_e2e, tmp_path):
    """The acceptance of issue #42 through the CLI and the pipeline: a study of four radiographs (one an adult's, out
    of scope; sentinels in every identifying tag) and `infer --images dicomweb://...?StudyInstanceUID=S --write-back
    --heatmaps`: one report per image and a Segmentation and a Secondary Capture per `ok` image, in the study, each
    referring to its source; dciodvfy finds no error in any of them and dcmjs reads TID 1500, the source instance, the
    finding and the probability from each report. `--resume` stores nothing (the captures it now lists are its own)."""
    import pydicom
    from test_pacs import objects_in, some_jpegs

    from dicom_tools import dciodvfy_errors, dcmjs_reports
    from fixtures.dicom_factory import radiograph
    from xray.storage import dicomweb

    pacs, env = pacs_e2e
    study = pydicom.uid.generate_uid()
    client = dicomweb.Client(dicomweb.parse(pacs.dicomweb))
    for index, jpeg in enumerate(some_jpegs(4)):
        age = "045Y" if index == 3 else "003Y"
        client.store([radiograph(jpeg, age=age, sentinels=True, StudyInstanceUID=study, PatientID="P42")])
    output = local.home / "pacs-heatmaps" / "preds.csv"  # under the stores searched for sentinels below
    command = [ROOT / "run.py", "infer", "--images", f"{pacs.dicomweb}?StudyInstanceUID={study}", "--output", output]
    first = run_command([*command, "--write-back", "--heatmaps"], env, 900)
    summary = summary_of(first)
    table = pd.read_csv(output, keep_default_na=False, dtype=str).set_index("sop_instance_uid")
    ok = set(table.index[table["status"] == "ok"])
    assert len(table) == 4 and 0 < len(ok) < 4  # the adult's image is out of scope
    assert summary["reports_written"] == 4 and summary["heatmaps_written"] == len(ok)
    written = {kind: [o for o in found if o[0].StudyInstanceUID == study] for kind, found in objects_in(pacs).items()}
    assert {kind: len(found) for kind, found in written.items()} == {"SR": 4, "SEG": len(ok), "OT": len(ok)}
    seg_sources = {
        d.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID for d, _ in written["SEG"]
    }
    assert seg_sources == ok
    assert {d.SourceImageSequence[0].ReferencedSOPInstanceUID for d, _ in written["OT"]} == ok
    paths = []
    for kind, found in written.items():
        for dataset, data in found:
            paths.append(tmp_path / f"{kind}-{dataset.SOPInstanceUID}.dcm")
            paths[-1].write_bytes(data)
    assert not {path.name: errors for path in paths if (errors := dciodvfy_errors(path))}
    for read in dcmjs_reports([path for path in paths if path.name.startswith("SR-")]):
        ((group,),) = [read["groups"]]
        source, codes = group["sourceSOPInstanceUID"], {c["concept"]["value"] for c in group["codes"]}
        assert read["template"] == "1500" and source in table.index
        if source in ok:
            assert "233604007" in codes  # SNOMED CT Pneumonia, present or absent
            assert group["numbers"][0]["value"] == pytest.approx(float(table.loc[source, "probability"]), abs=1e-6)
        else:
            assert "233604007" not in codes and group["numbers"] == []
    resumed = run_command([*command, "--write-back", "--heatmaps", "--resume"], env, 900)
    again = summary_of(resumed)
    assert again["reports_written"] == again["heatmaps_written"] == 0 and again["own_captures_skipped"] == len(ok)
    after = {kind: [o for o in found if o[0].StudyInstanceUID == study] for kind, found in objects_in(pacs).items()}
    assert {kind: len(found) for kind, found in after.items()} == {kind: len(found) for kind, found in written.items()}
    # The PACS objects carry the patient and study modules by design (in tmp_path); nothing else does.
    _assert_no_sentinel(local.home, first.stdout, first.stderr, resumed.stdout, resumed.stderr)


def test_the_dicom_node_takes_studies_from_storescu_and_orthanc_and_reports_each_image_once(local, tmp_path):
    """`run.py node` on the local stack's champion, with a loopback C-STORE destination and Orthanc over STOW-RS:
    dcmtk's storescu sends a study (and a calling AE not allowed is refused), Orthanc (as a client, its DICOM server
    off) pushes one through REST /modalities/{id}/store, and a third study is cut by `kill -9` and finished after a
    restart. Every image is reported once at each destination and logged once in the stack's prediction log; no
    identifying value anywhere in the stores, the streams or the spool's records."""
    import base64
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from test_pacs import PASSWORD, reports_in

    from infra.pacs import Pacs
    from node_tools import Destination, no_sentinel_in, study, tree_text, uids
    from xray.storage import dicomweb

    pacs = Pacs(state=tmp_path / "pacs", port=free_port(), password=PASSWORD)
    env = local.env | {dicomweb.USER_ENV: pacs.user, dicomweb.PASSWORD_ENV: PASSWORD, "TMPDIR": str(tmp_path)}
    destination, port, spool = Destination(), free_port(), tmp_path / "spool"
    command = [sys.executable, ROOT / "run.py", "node", "--port", str(port), "--spool", spool, "--stable-seconds", "3"]
    command += ["--destination", destination.uri, "--destination", pacs.dicomweb, "--allow", "MODALITY,ORTHANC"]
    stderr = tmp_path / "node.stderr"

    def start():
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(stderr, "ab"), text=True
        )
        echo = ["echoscu", "-aet", "MODALITY", "-aec", "XRAY_AI", "127.0.0.1", str(port)]
        deadline = time.monotonic() + 300
        while subprocess.run(echo, capture_output=True, timeout=60).returncode != 0:
            assert process.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(1)
        return process

    def storescu(files, calling="MODALITY"):
        args = ["storescu", "-aet", calling, "-aec", "XRAY_AI", "127.0.0.1", str(port), *map(str, files)]
        return subprocess.run(args, capture_output=True, text=True, timeout=120)

    def wait_for(count):
        deadline = time.monotonic() + 180
        while len(destination.objects("SR")) < count:
            assert time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(0.5)

    def orthanc(method, path, body):
        request = urllib.request.Request(
            pacs.url + path,
            data=body if isinstance(body, bytes) else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": "Basic " + base64.b64encode(f"{pacs.user}:{PASSWORD}".encode()).decode()},
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            return json.loads(answer.read() or b"null")

    studies = {name: study(count) for name, count in (("storescu", 3), ("orthanc", 2), ("killed", 4))}
    for name, files in studies.items():
        for index, data in enumerate(files):
            (tmp_path / f"{name}-{index}.dcm").write_bytes(data)
    paths = {name: [tmp_path / f"{name}-{i}.dcm" for i in range(len(files))] for name, files in studies.items()}
    saved = {key: os.environ.get(key) for key in (dicomweb.USER_ENV, dicomweb.PASSWORD_ENV)}
    os.environ.update({dicomweb.USER_ENV: pacs.user, dicomweb.PASSWORD_ENV: PASSWORD})
    node = None
    try:
        pacs.up(die_with_parent=True)
        with destination.running():
            node = start()
            assert storescu(paths["storescu"]).returncode == 0
            refused = storescu(paths["storescu"][:1], calling="NOT_ALLOWED")
            assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr
            wait_for(3)
            ids = [orthanc("POST", "/instances", data)["ID"] for data in studies["orthanc"]]
            orthanc("PUT", "/modalities/xray-node", {"AET": "XRAY_AI", "Host": "127.0.0.1", "Port": port})
            pushed = orthanc("POST", "/modalities/xray-node/store", {"Resources": ids, "Synchronous": True})
            assert pushed["InstancesCount"] == 2 and pushed["FailedInstancesCount"] == 0
            wait_for(5)
            assert storescu(paths["killed"][:2]).returncode == 0
            node.send_signal(signal.SIGKILL)
            node.wait(timeout=60)
            node = start()
            assert storescu(paths["killed"][1:]).returncode == 0
            wait_for(9)
            node.send_signal(signal.SIGTERM)
            out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, stderr.read_text()[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        sent = {uids(data)[1] for files in studies.values() for data in files}
        at_destination = [
            report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            for report in destination.objects("SR")
        ]
        assert sorted(ref.ReferencedSOPInstanceUID for ref in at_destination) == sorted(sent)
        assert all(len(items) == 1 for items in destination.received.values())
        in_pacs = reports_in(pacs)
        assert (
            len(in_pacs) == 9
            and {
                r.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence[0]
                .ReferencedSOPSequence[0]
                .ReferencedSOPInstanceUID
                for r in in_pacs
            }
            == sent
        )
        _, log = _prediction_log(local.home)
        node_rows = log[log["source"] == "node"]
        assert sorted(node_rows["sop_instance_uid"]) == sorted(sent) and summary["dead_letters"] == 0
        assert not list(spool.glob("studies/*/*.dcm"))
        streams = stderr.read_text()
        assert "'NOT_ALLOWED' at 127.0.0.1" in streams and PASSWORD not in streams
        no_sentinel_in(tree_text(spool))
        _assert_no_sentinel(local.home, out, streams)
    finally:
        if node is not None and node.poll() is None:
            node.kill()
        pacs.down()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


SERVE_A_REQUEST = """
import base64, pathlib, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/chest-xray-classifier@champion")
images = [base64.b64encode(p.read_bytes()).decode() for p in sorted(pathlib.Path(sys.argv[1]).glob("*.jpeg"))]
print(len(model.predict(pd.DataFrame({"image": images}))))
"""


def test_two_batches_and_serving_meet_their_labels_and_a_week_that_went_wrong_alerts(local, tmp_path):
    """Two inference runs and a served request land in the prediction log; the first run's part is moved a week
    back. A labels file whose findings run against the model that week and with it the week after: the feedback run
    reports both weeks with intervals, exports the labelled batch images as sources, logs to MLflow, and with
    --fail-on-degradation exits 4 with one line per alert, each naming the first week; unmatched and conflicting
    labels are counted."""
    from datetime import datetime, timedelta, timezone

    from mlflow.tracking import MlflowClient

    from xray.monitoring.performance.feedback import period_of

    env = local.env
    folders = {name: tmp_path / name for name in ("week-a", "week-b", "serving")}
    with zipfile.ZipFile(FULL_ZIP) as archive:
        test = sorted(n for n in archive.namelist() if "/test/" in n and n.endswith(".jpeg"))
        normal, pneumonia = [n for n in test if "/NORMAL/" in n], [n for n in test if "/PNEUMONIA/" in n]
        chosen = {"week-a": normal[:60] + pneumonia[:60], "week-b": normal[60:90] + pneumonia[60:90]}
        chosen["serving"] = normal[90:94] + pneumonia[90:94]
        for name, entries in chosen.items():
            folders[name].mkdir()
            for entry in entries:  # re-encoded: bytes (and sha256) no other test has predicted
                image = Image.open(io.BytesIO(archive.read(entry))).convert("RGB")
                image.save(folders[name] / entry.rsplit("/", 1)[1], quality=92)
    tables = {}
    for name in ("week-a", "week-b"):
        output = tmp_path / f"{name}.csv"
        result = run_command(
            [ROOT / "run.py", "--pipeline", "inference", "--images", folders[name], "--output", output], env, 900
        )
        assert summary_of(result)["prediction_log_rows"] == len(chosen[name])
        tables[name] = pd.read_csv(output, keep_default_na=False)
    root, _ = _prediction_log(local.home)
    served = run_command(["-c", SERVE_A_REQUEST, folders["serving"]], env | {"XRAY_PREDICTION_LOG": str(root)}, 600)
    assert served.returncode == 0 and served.stdout.strip() == "8", served.stderr[-3000:]

    # The first run's part, a week back: what the log holds for a batch predicted last week.
    now = datetime.now(timezone.utc)
    for part in sorted(root.glob("date=*/*.parquet")):
        rows = pd.read_parquet(part)
        if (rows["input"] == str(folders["week-a"])).all():
            rows["time"] = rows["time"] - pd.Timedelta(days=7)
            moved = root / f"date={rows['time'].iloc[0]:%Y-%m-%d}" / part.name
            moved.parent.mkdir(exist_ok=True)
            rows.to_parquet(moved, index=False)
            part.unlink()
    _, log = _prediction_log(local.home)
    assert (log["source"] == "serving").sum() >= 8 and (log["input"] == str(folders["week-a"])).sum() == 120
    week_a, week_b = period_of(pd.Series([now - timedelta(days=7), now]), "week").tolist()

    # Labels: last week the readers' findings run against the model's ranking (its AUC collapses); this week they
    # follow it. (The smoke model calls every image PNEUMONIA at its threshold of a near-random val, so no pneumonia
    # can be missed here: the sensitivity alert is measured in tests/xray/monitoring/test_feedback.py.)
    def read(table, agree: bool):
        answered = table[table["status"] == "ok"].sort_values("probability", kind="stable")
        upper = np.arange(len(answered)) >= len(answered) // 2
        findings = np.where(upper == agree, "PNEUMONIA", "NORMAL")
        return pd.DataFrame({"sha256": answered["sha256"], "label": findings})

    served_rows = log[log["source"] == "serving"].drop_duplicates("sha256")
    conflicting = served_rows.loc[served_rows["status"] == "ok", "sha256"].iloc[0]
    labels = pd.concat(
        [
            read(tables["week-a"], agree=False),
            read(tables["week-b"], agree=True),
            read(served_rows, agree=True),
            pd.DataFrame({"sha256": ["0" * 64, "1" * 64, conflicting], "label": ["NORMAL", "NORMAL", "?"]}),
        ],
        ignore_index=True,
    )
    first = labels.index[labels["sha256"] == conflicting][0]
    labels.iloc[-1, 1] = "NORMAL" if labels.loc[first, "label"] == "PNEUMONIA" else "PNEUMONIA"
    answered = {name: int((t["status"] == "ok").sum()) for name, t in tables.items()}
    labels_path = tmp_path / "labels.csv"
    labels.to_csv(labels_path, index=False)
    config = yaml.safe_load(local.config.read_text())
    config.setdefault("monitoring", {})["feedback_min_per_class"] = 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    output = tmp_path / "feedback"
    result = run_command(
        [
            ROOT / "run.py",
            "--pipeline",
            "feedback",
            "--config",
            tmp_path / "config.yaml",
            "--labels",
            labels_path,
            "--output",
            output,
            "--fail-on-degradation",
        ],
        env,
        900,
    )
    assert result.returncode == 4, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(f"period {week_a}," in line for line in errors), errors
    assert any(line.startswith(f"error: AUC degraded in period {week_a}, site (none), v") for line in errors), errors
    assert summary["unmatched_labels"] == 2 and summary["conflicting_labels"] == 1
    served_answered = int((served_rows["status"] == "ok").sum())
    assert summary["labelled_predictions"] == answered["week-a"] + answered["week-b"] + served_answered - 1
    performance = pd.read_csv(output / "performance.csv", keep_default_na=False)
    assert performance["period"].tolist() == [week_a, week_b]
    bad, good = performance.iloc[0], performance.iloc[1]
    assert bad["auc"] < 0.2 and bad["auc_low"] <= bad["auc"] <= bad["auc_high"] < 0.5, bad.to_dict()
    assert good["auc"] > 0.9 and good["positives"] >= 3 and good["negatives"] >= 3
    assert bad["sensitivity_low"] <= bad["sensitivity"] <= bad["sensitivity_high"]
    assert {"auc_low", "auc_high", "ece", "share_out_of_distribution"} <= set(performance.columns)
    assert (output / "feedback_sensitivity.png").stat().st_size > 10_000
    sources = yaml.safe_load((output / "sources.yaml").read_text())["data"]["sources"]
    assert sorted(s["uri"] for s in sources) == sorted(str(folders[n]) for n in ("week-a", "week-b"))
    assert summary["labelled_without_stored_image"] == served_answered - 1  # served: never stored
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("chest-xray-feedback")
    runs = client.search_runs([experiment.experiment_id])
    assert any(run.data.tags.get("degraded") == "true" for run in runs)
    # Feedback puts the estimate of the same predictions beside the realised metrics, one plot per metric.
    both = pd.read_csv(output / "estimated_vs_realised.csv", keep_default_na=False)
    assert both["period"].tolist() == [week_a, week_b] and {"estimated_auc_low", "auc_high", "verdict"} <= set(both)
    assert (output / "estimated_auc.png").stat().st_size > 10_000

    # Before any label: monitor --from-log (the earlier form, --pipeline monitoring) estimates every week, site and
    # version of the same log. No labels file exists any more, and the command takes none.
    labels_path.unlink()
    estimated = run_command(
        [
            ROOT / "run.py",
            "--pipeline",
            "monitoring",
            "--from-log",
            "--config",
            tmp_path / "config.yaml",
            "--output",
            tmp_path / "estimated",
        ],
        env,
        900,
    )
    summary = summary_of(estimated)
    groups = {(e["period"], e["site"]): e for e in summary["estimates"]}
    assert {(week_a, ""), (week_b, "")} <= set(groups) and summary["estimated_groups"] == len(summary["estimates"])
    week = groups[(week_a, "")]
    assert week["verdict"] in ("reliable", "unreliable") and (week["verdict"] == "reliable") == (not week["reasons"])
    assert week["answered"] == answered["week-a"]  # the smoke model's week: which estimates are defined varies
    printed = [
        re.sub(r"\x1b\[[0-9;]*m", "", line).strip()  # the console's colours
        for line in estimated.stderr.splitlines()
        if f"estimated period {week_a}, site (none), v" in line
    ]
    assert len(printed) == 1 and f": {week['answered']} answered; " in printed[0], printed
    shown = [m for m in ("sensitivity", "specificity", "ppv", "npv", "auc") if week[f"estimated_{m}"] is not None]
    assert shown, week  # the smoke model's week: at least the metrics whose estimate is finite, each with its band
    for m in shown:
        band = f"{m} {week[f'estimated_{m}']:.3f} ({week[f'estimated_{m}_low']:.3f}-{week[f'estimated_{m}_high']:.3f})"
        assert band in printed[0], (band, printed[0])
        assert 0 <= week[f"estimated_{m}_low"] <= week[f"estimated_{m}_high"] <= 1
    assert printed[0].endswith(week["verdict"] + (f": {week['reasons']}" if week["reasons"] else "")), printed[0]
    assert {"estimates.csv", "report.json", "estimated_sensitivity.png"} <= {
        p.name for p in (tmp_path / "estimated").iterdir()
    }
    experiment = client.get_experiment_by_name("chest-xray-monitoring")
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    # Every finite estimate of the week is a series (an undefined one, such as the AUC of a week of one called class,
    # is not logged), and so is its verdict.
    for name in ["reliable", *shown]:
        assert any(key.startswith(f"estimated_{name}/no-site/v") for key in run.data.metrics), (name, run.data.metrics)


def test_sharded_inference_fans_out_steps_and_writes_the_rows_of_one_run(local, tmp_path):
    """--shards 3: three predict steps in the run, each its own part beside the output, merged into it; every image
    once, scored as the champion scores it; a rerun with --resume predicts nothing again."""
    env = local.env
    output = tmp_path / "out" / "preds.parquet"
    command = [
        ROOT / "run.py",
        "--pipeline",
        "inference",
        "--images",
        local.images,
        "--output",
        output,
        "--shards",
        "3",
    ]
    summary = summary_of(run_command(command, env, 900))
    table = pd.read_parquet(output)
    assert summary["shards"] == 3 and summary["rows_written"] == len(table) == 20 == summary["images"]
    assert sorted(table["path"]) == sorted(str(p) for p in local.images.glob("*.jpeg"))
    parts = [output.with_name(f"preds.part-{i}-of-3.parquet") for i in range(3)]
    assert summary["parts"] == [str(p) for p in parts] and sum(len(pd.read_parquet(p)) for p in parts) == 20
    np.testing.assert_allclose(table["probability"], champion_probabilities(env, table["path"]), atol=1e-5)
    script = "import sys; from zenml.client import Client; print(sorted(Client().get_pipeline_run(sys.argv[1]).steps))"
    steps = run_command(["-c", script, summary["pipeline_run_id"]], env, 120)
    expected = "['merge_predictions', 'predict_batch_0', 'predict_batch_1', 'predict_batch_2', 'resolve_model_version']"
    assert steps.stdout.strip() == expected, steps.stderr[-2000:]
    again = summary_of(run_command([*command, "--resume"], env, 900))
    assert again["skipped_already_predicted"] == 20 and again["rows_written"] == 20


def test_batch_inference_runs_on_the_runtime_this_cpu_gets(local, tmp_path, monkeypatch):
    """inference.runtime auto (the default; the other tests pin keras): OpenVINO in bf16 where the CPU has BF16, else
    Keras. The summary and the MLflow run say which ran, and the probabilities stay those of the champion (to 0.05 in
    bf16, above the 0.044 measured on the 128-px version's test split; to 1e-5 on Keras)."""
    from xray.serving.predictor import choose_runtime

    env = local.env | {"XRAY_INFERENCE_RUNTIME": "auto"}
    output = tmp_path / "preds.csv"
    command = [ROOT / "run.py", "--pipeline", "inference", "--images", local.images, "--output", output]
    summary = summary_of(run_command(command, env, 900))
    monkeypatch.setenv("XRAY_INFERENCE_RUNTIME", "auto")  # this process pins keras (conftest), as the run does not
    runtime, precision = choose_runtime("auto")
    assert summary["runtime"] == f"{runtime} {precision}"
    table = pd.read_csv(output)
    tolerance = 0.05 if precision == "bf16" else 1e-5  # bf16: at most 0.044 on the 128-px version (BENCHMARKS)
    np.testing.assert_allclose(table["probability"], champion_probabilities(env, table["path"]), atol=tolerance)
    client = mlflow_client(env)
    experiment = client.get_experiment_by_name("chest-xray-inference").experiment_id
    latest = client.search_runs([experiment], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert latest.data.params["runtime"] == summary["runtime"]
