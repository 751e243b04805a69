"""After a training run: batch inference (folder and S3 prefix), REST serving, monitoring, Grad-CAM and the model card.

Uses the champion of the smoke run on the team stack (conftest.trained): every read goes through its MLflow
tracking server, and the pipelines run with `--stack team`.
"""

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import MINI_ZIP, ROOT
from xray import s3

pytestmark = pytest.mark.slow


def _infer(env, *args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--pipeline", "inference", "--stack", "team", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _reference(env, paths):
    """mlflow.keras.load_model on the same version, with the recorded preprocessing."""
    import mlflow
    import tensorflow as tf

    from xray.data import decode_and_resize

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    info = mlflow.models.get_model_info("models:/chest-xray-classifier@champion")
    model = mlflow.keras.load_model("models:/chest-xray-classifier@champion")
    pixels = np.stack(
        [decode_and_resize(tf.io.read_file(str(p)), int(info.metadata["image_size"])).numpy() for p in paths]
    ).astype("float32")
    return model.predict(pixels, verbose=0).reshape(-1)


def test_batch_inference_on_a_folder(trained):
    home, env, images, _ = trained
    (images / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    summary = _infer(env, "--images", str(images), "--output", str(home / "out" / "preds.csv"), "--explain", "2")
    table = pd.read_csv(home / "out" / "preds.csv", keep_default_na=False, na_values=[""])
    assert list(table.columns) == [
        "path",
        "probability",
        "label",
        "threshold",
        "ood_score",
        "status",
        "reason",
        "model_version",
    ]
    assert len(table) == 21 and summary["unreadable"] == 1
    bad = table[table["status"] == "unreadable"]
    assert bad["path"].str.endswith("corrupt.jpeg").all() and bad["probability"].isna().all()
    assert bad["ood_score"].isna().all() and (bad["reason"] == "not a recognised image format").all()
    good = table[table["status"] != "unreadable"]
    assert len(good) == 20 and set(good["label"]) <= {"NORMAL", "PNEUMONIA"}
    assert set(good["status"]) <= {"ok", "out_of_distribution"} and good["ood_score"].notna().all()
    assert good.loc[good["status"] == "ok", "ood_score"].le(1).all()
    assert summary["out_of_distribution"] == int((good["status"] == "out_of_distribution").sum())
    assert good.loc[good["status"] == "out_of_distribution", "reason"].str.len().gt(0).all()
    np.testing.assert_allclose(good["probability"], _reference(env, good["path"]), atol=1e-5)
    assert (good["model_version"].astype(str) == "1").all()
    pngs = sorted((home / "out").glob("gradcam_*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)
    (images / "corrupt.jpeg").unlink()


def test_batch_inference_on_an_s3_prefix(trained):
    home, env, images, _ = trained
    with s3.EmbeddedS3():
        client = s3.make_client(1)
        client.create_bucket(Bucket="incoming")
        for path in sorted(images.glob("*.jpeg")):
            client.upload_file(str(path), "incoming", f"batch-7/{path.name}")
        s3_env = env | {
            k: os.environ[k]
            for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
        }
        _infer(s3_env, "--images", "s3://incoming/batch-7/", "--output", str(home / "s3" / "preds.csv"))
    table = pd.read_csv(home / "s3" / "preds.csv")
    assert len(table) == 20 and (table["status"] != "unreadable").all()
    assert table["path"].str.startswith("s3://incoming/batch-7/").all()
    local = [images / p.rsplit("/", 1)[1] for p in table["path"]]
    np.testing.assert_allclose(table["probability"], _reference(env, local), atol=1e-5)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port, body):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_rest_serving_matches_batch_inference(trained):
    home, env, images, _ = trained
    port = _free_port()
    # The scoring server is started as `uvicorn ...` from PATH: put this interpreter's bin first.
    env = env | {"PATH": f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/chest-xray-classifier@champion",
            "--env-manager",
            "local",
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
        ],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
            assert server.poll() is None, server.stdout.read()[-3000:]
        else:
            pytest.fail("mlflow models serve did not come up")
        image = sorted(images.glob("*.jpeg"))[0]
        status, body = _post(port, {"inputs": [base64.b64encode(image.read_bytes()).decode()]})
        assert status == 200, body
        prediction = body["predictions"][0]
        assert prediction["probability"] == pytest.approx(float(_reference(env, [image])[0]), abs=1e-5)
        assert prediction["label"] in ("NORMAL", "PNEUMONIA")
        assert prediction["status"] in ("ok", "out_of_distribution") and isinstance(prediction["ood_score"], float)
        status, body = _post(port, {"inputs": [base64.b64encode(b"\xff\xd8\xff corrupt").decode()]})
        assert 400 <= status < 500, body
        assert "cannot be decoded" in body.get("message", "")
        # One unreadable image among readable ones does not fail the request: it gets its own row.
        inverted = (255 - np.asarray(Image.open(image).convert("RGB"))).astype("uint8")
        buffer = io.BytesIO()
        Image.fromarray(inverted).save(buffer, format="PNG")
        status, body = _post(
            port,
            {
                "inputs": [
                    base64.b64encode(image.read_bytes()).decode(),
                    base64.b64encode(b"\xff\xd8\xff corrupt").decode(),
                    base64.b64encode(buffer.getvalue()).decode(),
                ]
            },
        )
        assert status == 200, body
        rows = body["predictions"]
        assert rows[0]["probability"] == pytest.approx(prediction["probability"], abs=1e-6)
        assert rows[1]["status"] == "unreadable" and rows[1]["probability"] is None and rows[1]["reason"]
        assert rows[2]["status"] == "out_of_distribution" and rows[2]["ood_score"] > 1
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_model_card_numbers_equal_logged_metrics(trained):
    import mlflow
    from mlflow.tracking import MlflowClient

    home, env, _, summary = trained
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    version = MlflowClient().get_model_version("chest-xray-classifier", summary["model_version"])
    folder = mlflow.artifacts.download_artifacts(
        f"models:/chest-xray-classifier/{version.version}", dst_path=str(home / "card")
    )
    card = open(os.path.join(folder, "model_card.md")).read()
    metrics = MlflowClient().get_run(summary["mlflow_run_id"]).data.metrics
    for label, key in (
        ("AUC-ROC", "test_auc"),
        ("Sensitivity (PNEUMONIA recall)", "test_sensitivity"),
        ("Specificity (NORMAL recall)", "test_specificity"),
        ("Accuracy", "test_accuracy"),
    ):
        row = re.search(rf"^\| {re.escape(label)} \| ([0-9.]+) \|", card, re.MULTILINE)
        assert row and row.group(1) == f"{metrics[key]:.4f}", (label, row and row.group(1), metrics[key])
    assert f"{metrics['test_auc_ci_low']:.4f} to {metrics['test_auc_ci_high']:.4f}" in card
    assert f"{metrics['threshold']:.4f}, chosen on val only" in card
    assert "Not a medical device" in card and "Single source centre" in card and "grouped by patient" in card


def _monitor(env, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--pipeline", "monitoring", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _registry_state(env):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    return sorted(
        (v.version, v.current_stage, tuple(sorted(v.tags.items())), tuple(sorted(v.aliases)))
        for v in client.search_model_versions("name='chest-xray-classifier'")
    )


def test_monitoring_a_batch_writes_a_report_and_never_the_registry(trained, tmp_path):
    from mlflow.tracking import MlflowClient

    home, env, images, _ = trained
    before = _registry_state(env)
    result = _monitor(env, "--images", str(images), "--output", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"drift_detected", "p_value", "ood_fraction", "images"} <= summary.keys()
    assert summary["images"] == summary["readable"] == 20 and summary["model_version"] == "1"
    assert 0 <= summary["p_value"] <= 1 and summary["drift_detected"] == (summary["p_value"] < 0.01)
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"report.html", "report.json", "predictions.csv", "ood_scores.png", "acquisition.png"} <= written
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["ood_fraction"] == summary["ood_fraction"] and report["embedding"]["reference_images"] > 0
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("chest-xray-monitoring")
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    assert run.data.metrics["ood_fraction"] == pytest.approx(summary["ood_fraction"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "monitoring")} >= {
        "monitoring/report.html",
        "monitoring/report.json",
        "monitoring/ood_scores.png",
    }
    assert _registry_state(env) == before


def test_monitoring_fails_on_drift_when_asked(trained, tmp_path):
    _, env, images, _ = trained
    shifted = tmp_path / "inverted"
    shifted.mkdir()
    for path in sorted(images.glob("*.jpeg")):
        Image.fromarray(255 - np.asarray(Image.open(path).convert("RGB"))).save(shifted / path.name)
    result = _monitor(env, "--images", str(shifted), "--output", str(tmp_path / "report"), "--fail-on-drift")
    assert result.returncode == 3, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["drift_detected"] is True and summary["p_value"] < 0.01 and summary["ood_fraction"] > 0.5
    assert result.stderr.strip().splitlines()[-1].startswith("error: drift detected: ")


def test_a_batch_with_nothing_readable_is_one_error_line(trained, tmp_path):
    """It fails in the last step, after the batch was read and predicted: nothing of it reaches the registry.
    An empty folder and a broken zip fail earlier, in the same way (tests/unit/test_inference.py)."""
    _, env, _, _ = trained
    before = _registry_state(env)
    batch = tmp_path / "corrupt"
    batch.mkdir()
    (batch / "a.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    (batch / "b.png").write_bytes(b"")
    result = _monitor(env, "--images", str(batch))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: none of the 2 images could be read"), last
    assert _registry_state(env) == before


def test_evaluation_on_a_labelled_site_reaches_mlflow_the_version_and_its_card(trained, tmp_path):
    """--pipeline evaluation on a folder built from the mini archive, class folders at depth and in any case."""
    import mlflow
    from mlflow.tracking import MlflowClient

    home, env, _, _ = trained
    site = tmp_path / "site"
    with zipfile.ZipFile(MINI_ZIP) as archive:
        for name in archive.namelist():
            if name.startswith("chest_xray/test/") and name.endswith(".jpeg"):
                label, file = name.split("/")[-2:]
                target = site / "export" / "cxr" / (label if label == "NORMAL" else label.lower()) / file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    (site / "export" / "README.txt").write_text("not an image, outside the class folders")
    # The smoke config's calibration (a temperature): a one-epoch model may rank a small share backwards, which
    # Platt scaling refuses (tests/unit/test_calibration.py).
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "--pipeline",
            "evaluation",
            "--model-version",
            "1",
            "--config",
            str(home / "smoke.yaml"),
            "--dataset-uri",
            str(site),
            "--site",
            "hospital-b",
            "--recalibrate-fraction",
            "0.5",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["site"] == "hospital-b" and summary["model_version"] == "1" and summary["images"] == 47
    for name in ("auc", "accuracy", "sensitivity", "specificity", "ece"):
        metrics = summary["metrics"]
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
    recalibrated = summary["recalibrated"]
    assert recalibrated["calibration_images"] + recalibrated["measured_images"] == 47
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["site"] == "hospital-b" and run.data.tags["model_version"] == "1"
    assert run.data.metrics["site_auc"] == pytest.approx(summary["metrics"]["auc"])
    version = client.get_model_version("chest-xray-classifier", "1")
    assert float(version.tags["site.hospital-b.auc"]) == pytest.approx(summary["metrics"]["auc"], abs=1e-5)
    assert version.tags["site.hospital-b.run_id"] == summary["mlflow_run_id"]
    # The run's metrics are linked to the version's logged model.
    from xray.registry import logged_model_id

    linked = client.get_logged_model(logged_model_id(version)).metrics or []
    assert any(m.key == "site_auc" and m.run_id == summary["mlflow_run_id"] for m in linked)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    card = open(
        mlflow.artifacts.download_artifacts(
            "models:/chest-xray-classifier/1/model_card.md", dst_path=str(tmp_path / "card")
        )
    ).read()
    assert card.count("## Results by site") == 1
    row = f"| hospital-b | as registered | 47 | {summary['threshold']:.4f} | {summary['metrics']['auc']:.3f} ("
    assert row in card and "| hospital-b | recalibrated on 50% |" in card


def test_evaluation_of_a_site_without_both_classes_is_one_error_line(trained, tmp_path):
    _, env, images, _ = trained
    site = tmp_path / "normal-only" / "NORMAL"
    site.mkdir(parents=True)
    for path in sorted(images.glob("*.jpeg"))[:5]:
        (site / path.name).write_bytes(path.read_bytes())
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "--pipeline",
            "evaluation",
            "--dataset-uri",
            str(tmp_path / "normal-only"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no images in a PNEUMONIA/ folder" in result.stderr.strip().splitlines()[-1]
