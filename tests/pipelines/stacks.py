"""The stacks the end-to-end tests run on: the team stack (Team: its servers in a folder and ports of their own) and
the default local stack with an S3 source on moto (Local), and what their tests share."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from support import MINI_ZIP, ROOT, free_port, run_command


@dataclass
class Team:
    state: Path
    home: Path
    ports: dict[str, int]
    env: dict[str, str]
    info: dict = field(default_factory=dict)
    last_stderr: str = ""  # of the last command
    last_stack_stderr: str = ""  # of the last infra.team_stack command
    training_stderr: str = ""  # of the smoke training run (``trained``)
    zenml_token: str = ""
    decisions: dict = field(default_factory=dict)  # the trained version's approval attempts (``trained``)

    def stack(self, command: str, timeout: int = 300) -> dict:
        """An ``infra.team_stack`` command. Not through run_command: the servers it starts keep the TMPDIR they get."""
        ports = [f"--{name}-port={port}" for name, port in self.ports.items()]
        args = [sys.executable, "-m", "infra.team_stack", command, "--state", str(self.state), *ports]
        result = subprocess.run(args, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        self.last_stack_stderr = result.stderr
        return self._json_line(result)

    def run(self, *args: str, timeout: int = 900, account: str | None = None) -> dict:
        """``run.py --stack team ARGS``, as the stack's trainer or as another MLflow ``account`` (the reviewer)."""
        return self._json_line(self.command(*args, timeout=timeout, account=account))

    def command(self, *args: str, timeout: int = 900, account: str | None = None) -> subprocess.CompletedProcess:
        env = self.env | (self.mlflow_account(account) if account else {})
        return run_command([ROOT / "run.py", "--stack", "team", *args], env, timeout)

    @property
    def credentials(self) -> dict[str, str]:
        from infra.team.credentials import Credentials

        return Credentials(self.state).read()

    def mlflow_account(self, user: str) -> dict[str, str]:
        from infra.team.credentials import Credentials

        return Credentials(self.state).mlflow_account(user)

    def auth_headers(self, url: str, account: str = "trainer") -> dict[str, str]:
        """What a signed-in client sends: ZenML's bearer token, or MLflow's basic auth for ``account``."""
        import base64

        from infra.team.zenml import ZENML_USER, zenml_login

        if url.startswith(self.info["zenml_url"]):
            if not self.zenml_token:
                self.zenml_token = zenml_login(self.info["zenml_url"], ZENML_USER, self.credentials["zenml_password"])
            return {"Authorization": f"Bearer {self.zenml_token}"}
        password = self.credentials[f"mlflow_{account}_password"]
        return {"Authorization": "Basic " + base64.b64encode(f"{account}:{password}".encode()).decode()}

    def get(self, url: str) -> dict:
        request = urllib.request.Request(url, headers=self.auth_headers(url))
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def _json_line(self, result: subprocess.CompletedProcess) -> dict:
        """The last stdout line of a successful command, parsed."""
        assert result.returncode == 0, result.stderr[-3000:]
        self.last_stderr = result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])


def twenty_test_images(folder: Path) -> Path:
    """The first twenty test images of the mini archive, as files in ``folder``."""
    folder.mkdir(parents=True)
    with zipfile.ZipFile(MINI_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("chest_xray/test/") and n.endswith(".jpeg"))[:20]
        for name in names:
            (folder / name.rsplit("/", 1)[1]).write_bytes(archive.read(name))
    return folder


def champion_probabilities(env: dict, paths) -> np.ndarray:
    """The champion of ``env``'s MLflow store on image files, scored independently of the project's inference code:
    mlflow.keras.load_model and the preprocessing recorded in the version's metadata."""
    import mlflow
    import tensorflow as tf

    from xray.data.images import decode_and_resize

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    info = mlflow.models.get_model_info("models:/chest-xray-classifier@champion")
    model = mlflow.keras.load_model("models:/chest-xray-classifier@champion")
    pixels = np.stack(
        [decode_and_resize(tf.io.read_file(str(p)), int(info.metadata["image_size"])).numpy() for p in paths]
    ).astype("float32")
    return model.predict(pixels, verbose=0).reshape(-1)


LOCAL_SOURCE = "s3://hospital-data/xray/mini.zip"


SENTINEL_SECRET = "SENTINEL-d41d8cd98f00b204e9800998ecf8427e"


SENTINEL_ACCESS_KEY = "AKIASENTINELACCESSKEY"


@dataclass
class Local:
    home: Path  # both stores (ZenML client store, SQLite MLflow and its artifacts) and the run's files
    env: dict[str, str]  # isolated stores, the moto endpoint and the sentinel credentials, XRAY_TEST_CONFIG
    config: Path
    summary: dict
    result: subprocess.CompletedProcess
    images: Path  # twenty test images


@contextmanager
def moto_server():
    """A moto S3 server in its own process (an in-process one shares moto's backend with every other in-process
    endpoint, which each reset it); yields its endpoint URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def s3_client(env: dict[str, str]):
    """A boto3 S3 client for the endpoint and credentials in ``env`` (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


def run_cli(env, *args, timeout=900):
    """``run.py --pipeline training`` with the environment's config (XRAY_TEST_CONFIG) and ``args``."""
    return run_command(
        [ROOT / "run.py", "--pipeline", "training", "--config", env["XRAY_TEST_CONFIG"], *args], env, timeout
    )


def summary_of(result):
    """The summary line of a command that must have succeeded."""
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def mlflow_client(env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
