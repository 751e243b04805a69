"""After a training run: batch inference (folder and S3 prefix), REST serving, Grad-CAM and the model card.

Trains once with the smoke config in isolated stores, then uses the registered champion.
"""

import base64
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

from conftest import MINI_ZIP, ROOT, deterministic_smoke_config, isolated_env, require
from xray import s3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    home = tmp_path_factory.mktemp("use")
    deterministic_smoke_config(home / "smoke.yaml")
    env = isolated_env(home, CHEST_XRAY_ZIP=str(require(MINI_ZIP)))
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", str(home / "smoke.yaml")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    images = home / "twenty"
    images.mkdir()
    with zipfile.ZipFile(MINI_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("chest_xray/test/") and n.endswith(".jpeg"))[:20]
        for name in names:
            (images / name.rsplit("/", 1)[1]).write_bytes(archive.read(name))
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return home, env, images, summary


def _infer(env, *args):
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "--pipeline", "inference", *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
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
    pixels = np.stack([decode_and_resize(tf.io.read_file(str(p)), int(info.metadata["image_size"])).numpy()
                       for p in paths]).astype("float32")
    return model.predict(pixels, verbose=0).reshape(-1)


def test_batch_inference_on_a_folder(trained):
    home, env, images, _ = trained
    (images / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    summary = _infer(env, "--images", str(images), "--output", str(home / "out" / "preds.csv"), "--explain", "2")
    table = pd.read_csv(home / "out" / "preds.csv")
    assert list(table.columns) == ["path", "probability", "label", "threshold", "model_version", "status"]
    assert len(table) == 21 and summary["unreadable"] == 1
    bad = table[table["status"] != "ok"]
    assert bad["path"].str.endswith("corrupt.jpeg").all() and bad["probability"].isna().all()
    good = table[table["status"] == "ok"]
    assert len(good) == 20 and set(good["label"]) <= {"NORMAL", "PNEUMONIA"}
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
        s3_env = env | {k: os.environ[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                    "AWS_DEFAULT_REGION")}
        _infer(s3_env, "--images", "s3://incoming/batch-7/", "--output", str(home / "s3" / "preds.csv"))
    table = pd.read_csv(home / "s3" / "preds.csv")
    assert len(table) == 20 and (table["status"] == "ok").all()
    assert table["path"].str.startswith("s3://incoming/batch-7/").all()
    local = [images / p.rsplit("/", 1)[1] for p in table["path"]]
    np.testing.assert_allclose(table["probability"], _reference(env, local), atol=1e-5)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
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
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                               "models:/chest-xray-classifier@champion", "--env-manager", "local", "-p", str(port),
                               "-h", "127.0.0.1"], cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
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
        status, body = _post(port, {"inputs": [base64.b64encode(b"\xff\xd8\xff corrupt").decode()]})
        assert 400 <= status < 500, body
        assert "cannot be decoded" in body.get("message", "")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_model_card_numbers_equal_logged_metrics(trained):
    import mlflow
    from mlflow.tracking import MlflowClient

    home, env, _, summary = trained
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    version = MlflowClient().get_model_version("chest-xray-classifier", summary["model_version"])
    folder = mlflow.artifacts.download_artifacts(f"models:/chest-xray-classifier/{version.version}", dst_path=str(home / "card"))
    card = open(os.path.join(folder, "model_card.md")).read()
    metrics = MlflowClient().get_run(summary["mlflow_run_id"]).data.metrics
    for label, key in (("AUC-ROC", "test_auc"), ("Sensitivity (PNEUMONIA recall)", "test_sensitivity"),
                       ("Specificity (NORMAL recall)", "test_specificity"), ("Accuracy", "test_accuracy")):
        row = re.search(rf"^\| {re.escape(label)} \| ([0-9.]+) \|", card, re.MULTILINE)
        assert row and row.group(1) == f"{metrics[key]:.4f}", (label, row and row.group(1), metrics[key])
    assert f"{metrics['test_auc_ci_low']:.4f} to {metrics['test_auc_ci_high']:.4f}" in card
    assert f"{metrics['threshold']:.4f}, chosen on val only" in card
    assert "Not a medical device" in card and "Single source centre" in card and "grouped by patient" in card
