"""One real end-to-end run of the training pipeline on chest_xray_mini.zip.

Isolated stores: a temporary ZENML_CONFIG_PATH and a temporary SQLite MLflow.
The archive is found through $CHEST_XRAY_ZIP, so run.py stages it behind the
embedded moto S3 endpoint and ingest goes through the S3 code path.
"""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from conftest import MINI_ZIP, ROOT, dataset_entries, require

pytestmark = pytest.mark.slow
STEPS = ["ingest_from_s3", "unzip_and_validate", "build_datasets", "train_model", "evaluate_model", "register_model"]
SMOKE = ROOT / "configs" / "training_smoke.yaml"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Isolated stores, and the smoke config with a fixed low threshold.

    One epoch on a few images gives a near-random model, so whether the
    min_sensitivity policy passes the gate would be a coin toss. A fixed
    threshold of 0.02 makes sensitivity 1.0, so the first run's promotion is
    deterministic; the gate's own rules are unit-tested in test_registry_gate.
    """
    home = tmp_path_factory.mktemp("stores")
    raw = yaml.safe_load(SMOKE.read_text())
    raw["evaluate"] |= {"threshold_policy": "fixed", "fixed_threshold": 0.02}
    (home / "smoke.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "ZENML_"))}
    env |= {
        "ZENML_CONFIG_PATH": str(home / "zenml"),
        "ZENML_ANALYTICS_OPT_IN": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "CHEST_XRAY_ZIP": str(require(MINI_ZIP)),
        "XRAY_TEST_CONFIG": str(home / "smoke.yaml"),
    }
    return home, env


def run_cli(env, *args, timeout=900):
    config = env["XRAY_TEST_CONFIG"]
    return subprocess.run([sys.executable, str(ROOT / "run.py"), "--pipeline", "training", "--config", config, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


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
    assert "embedded S3 at http://127.0.0.1" in result.stdout
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
    assert {"plots/roc_pr_curves.png", "plots/confusion_matrix.png", "plots/calibration.png",
            "plots/training_curves.png", "data/class_distribution.png", "data/sample_grid.png"} <= artifacts
    version = client.get_model_version("chest-xray-classifier", "1")
    assert version.tags["promotion_decision"] == "promoted"
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == "1"


def test_champion_reload_reproduces_test_auc(first_run, stores):
    """An independent reload through the registry, with the recorded preprocessing."""
    import mlflow

    from xray.data import decode_and_resize

    summary, _ = first_run
    client = mlflow_client(stores[1])
    mlflow.set_tracking_uri(stores[1]["MLFLOW_TRACKING_URI"])
    model = mlflow.keras.load_model("models:/chest-xray-classifier@champion")
    tags = client.get_model_version_by_alias("chest-xray-classifier", "champion").tags
    size = int(tags["image_size"])
    assert float(tags["threshold"]) == pytest.approx(summary["threshold"])
    images, labels = [], []
    with zipfile.ZipFile(MINI_ZIP) as archive:
        for name in sorted(archive.namelist()):
            if name.startswith("chest_xray/test/") and name.endswith(".jpeg"):
                images.append(decode_and_resize(archive.read(name), size).numpy())
                labels.append(int("/PNEUMONIA/" in name))
    probabilities = model.predict(np.stack(images).astype("float32"), verbose=0).reshape(-1)
    assert roc_auc_score(labels, probabilities) == pytest.approx(summary["metrics"]["test_auc"], abs=0.005)


def test_identical_rerun_is_cached_by_content(first_run, stores):
    _, env = stores
    summary = summary_of(run_cli(env))
    assert summary["steps"]["ingest_from_s3"] == "completed"  # always re-reads the object
    assert all(summary["steps"][name] == "cached" for name in STEPS[1:])
    assert summary["model_version"] == first_run[0]["model_version"]


def test_bad_archive_fails_in_one_line_and_registers_nothing(first_run, stores, tmp_path):
    _, env = stores
    bad = tmp_path / "traversal.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        for name, data in (dataset_entries() | {"chest_xray/../../escape.jpeg": b"x"}).items():
            archive.writestr(name, data)
    before = len(mlflow_client(env).search_model_versions("name='chest-xray-classifier'"))
    result = run_cli(env, "--dataset-uri", str(bad))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unsafe archive: path traversal in entry 'chest_xray/../../escape.jpeg'")
    assert len(mlflow_client(env).search_model_versions("name='chest-xray-classifier'")) == before


def test_bad_config_is_rejected_before_any_step(stores, tmp_path):
    _, env = stores
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  batch_size: -4\n")
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", str(config)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: invalid config {config}: train.batch_size: Input should be greater than or equal to 1"
