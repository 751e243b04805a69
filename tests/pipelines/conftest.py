"""The pipeline layer's fixtures: the team stack brought up once per session with one smoke training run on it, and
one smoke training run on the default local stack; each shared by its file's tests."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from stacks import (
    LOCAL_SOURCE,
    SENTINEL_ACCESS_KEY,
    SENTINEL_SECRET,
    Local,
    Team,
    moto_server,
    s3_client,
    twenty_test_images,
)
from support import MINI_ZIP, ROOT, deterministic_smoke_config, free_port, isolated_env, require, run_command


@pytest.fixture(scope="session")
def team():
    # Not under pytest's tmp folder: the servers outlive a test's own folder.
    (ROOT / ".cache").mkdir(exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="team-test-", dir=ROOT / ".cache"))
    home = state / "client"
    home.mkdir()
    ports = {"zenml": free_port(), "mlflow": free_port(), "s3": free_port(), "pg": free_port()}
    # Its own temporary folder too: the pytest folder is 0700, and the stack's servers keep this one.
    (state / "tmp").mkdir()
    env = isolated_env(home, CHEST_XRAY_ZIP=str(require(MINI_ZIP)), TMPDIR=str(state / "tmp"))
    team = Team(state / "stack", home, ports, env)
    before: dict[str, str | None] = {}
    try:
        # Inside the try: an `up` that fails or times out part-way still has what it started stopped below.
        team.info = team.stack("up")
        # The client's MLflow calls (tests, `mlflow models serve`) go where the stack's tracker logs, as its account.
        team.env["MLFLOW_TRACKING_URI"] = team.info["mlflow_tracking_uri"]
        team.env |= team.mlflow_account("trainer")
        before = {key: os.environ.get(key) for key in team.mlflow_account("trainer")}
        os.environ.update(team.mlflow_account("trainer"))  # the tests' own MLflow clients, in this process
        yield team
    finally:
        for key, value in before.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
        team.stack("down")
        from infra.team_stack import TeamStack

        # outside the state folder when PostgreSQL runs as `postgres`
        postgres = TeamStack(state=team.state).postgres.home
        if postgres != team.state:
            shutil.rmtree(postgres, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def trained(team):
    """One smoke training run on the team stack, which leaves a pending candidate (its trainer account cannot move
    `champion`); the trainer's approval, refused, and the reviewer's, which makes it champion (team.decisions).
    Returns (home, env, twenty test images, the training summary)."""
    home = team.home
    # MobileNetV3Large, not ResNet50V2 (the local stack's runs train that): what this stack is tested on is its servers,
    # accounts and bucket, and every version crosses them whole several times (logged, validated by MLflow, sealed,
    # served): 17 MB of weights instead of 94.
    model = {"backbone": "mobilenetv3large"}
    deterministic_smoke_config(home / "smoke.yaml", registry={"require_approval": True}, model=model)
    summary = team.run("--config", str(home / "smoke.yaml"))
    team.training_stderr = team.last_stderr
    approve = ["approve", "--config", str(home / "smoke.yaml"), "--model-version", summary["model_version"]]
    team.decisions["trainer"] = team.command(*approve, "--reason", "the trainer's own model")
    team.decisions["typed name"] = team.command(
        *approve, "--reviewer", "Dr. Somebody Else", "--reason", "x", account="reviewer"
    )
    team.decisions["reviewer"] = team.run(*approve, "--reason", "smoke model, checked by hand", account="reviewer")
    return home, team.env, twenty_test_images(home / "twenty"), summary


@pytest.fixture(scope="session")
def local(tmp_path_factory):
    """The smoke config (fixed low threshold: deterministic_smoke_config) on the default local stack, with isolated
    stores. Its archive is read from an explicit s3:// URI on a moto endpoint that lives for the session, with a
    sentinel in AWS_SECRET_ACCESS_KEY that must appear nowhere afterwards. (The other default, a local archive staged
    behind the embedded S3 endpoint, is the team stack's run: ``trained``.)"""
    import yaml

    home = tmp_path_factory.mktemp("local")
    config = deterministic_smoke_config(home / "smoke.yaml", s3={"embedded": False})
    config.write_text(yaml.safe_dump(yaml.safe_load(config.read_text()) | {"dataset_uri": LOCAL_SOURCE}))
    with moto_server() as endpoint:
        credentials = {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": SENTINEL_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SENTINEL_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        client = s3_client(credentials)
        bucket, key = LOCAL_SOURCE[len("s3://") :].split("/", 1)
        client.create_bucket(Bucket=bucket)
        client.upload_file(str(require(MINI_ZIP)), bucket, key)
        env = isolated_env(home, XRAY_TEST_CONFIG=str(config), **credentials)
        result = run_command([ROOT / "run.py", "--config", config, "--summary", home / "summary.json"], env, 900)
        assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        yield Local(home, env, config, summary, result, twenty_test_images(home / "twenty"))


@pytest.fixture(scope="session")
def stores(local):
    """The local run's (home, environment): its isolated ZenML and MLflow stores."""
    return local.home, local.env
