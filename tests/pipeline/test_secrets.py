"""Credentials never reach configs, logs, MLflow, ZenML metadata or the summary.

The run reads an explicit s3:// URI from a moto endpoint, with a sentinel in
AWS_SECRET_ACCESS_KEY; afterwards every output stream and every file of both
stores (SQLite databases and artifacts included) is searched for it.
"""

import json
import subprocess
import sys

import pytest

from conftest import MINI_ZIP, ROOT, deterministic_smoke_config, isolated_env, require
from xray import s3

pytestmark = pytest.mark.slow
SENTINEL = "SENTINEL-d41d8cd98f00b204e9800998ecf8427e"
ACCESS_KEY = "AKIASENTINELACCESSKEY"


def test_sentinel_secret_appears_nowhere(tmp_path):
    home = tmp_path / "stores"
    config = deterministic_smoke_config(tmp_path / "smoke.yaml", s3={"embedded": False})
    with s3.EmbeddedS3() as moto:
        s3.upload_if_missing(s3.make_client(1), require(MINI_ZIP), s3.S3Location("hospital-data", "xray/mini.zip"))
        env = isolated_env(
            home,
            AWS_ENDPOINT_URL_S3=moto.endpoint,
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SENTINEL,
            AWS_DEFAULT_REGION="us-east-1",
        )
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "run.py"),
                "--config",
                str(config),
                "--dataset-uri",
                "s3://hospital-data/xray/mini.zip",
                "--summary",
                str(home / "summary.json"),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((home / "summary.json").read_text())
    assert summary["model_version"] == "1"
    for stream in (result.stdout, result.stderr):
        assert SENTINEL not in stream and ACCESS_KEY not in stream
    searched = 0
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            searched += 1
            assert SENTINEL.encode() not in data, f"secret found in {path}"
            assert ACCESS_KEY.encode() not in data, f"access key id found in {path}"
    assert searched > 10  # both stores, databases and artifacts, were really searched
    assert any(p.suffix == ".db" for p in home.rglob("*"))
