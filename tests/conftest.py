"""Shared fixtures: synthetic archives built on the fly, and the real ones from ../shared."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MINI_ZIP = SHARED_DATA / "chest_xray_mini.zip"
FULL_ZIP = SHARED_DATA / "chest_xray_224.zip"
NEAR_OOD_ZIP = SHARED_DATA / "near_ood_adult_cxr_224.zip"

from xray.environment import apply_defaults  # noqa: E402 - before TensorFlow or ZenML is imported

apply_defaults()
# The tests compare served, batch and Keras probabilities to 1e-5, so the model runs on Keras here and in every
# command they start (isolated_env); the OpenVINO runtime has its own tests (tests/unit/test_runtimes.py, and one run
# in tests/pipeline/test_local_stack.py that sets auto).
os.environ["XRAY_INFERENCE_RUNTIME"] = "keras"
# ZenML resolves step and cache-policy sources against a source root: the .zen folder's, else the main module's folder.
# A pytest-xdist worker's main module has no file and a fresh clone has no .zen, so the tests that import steps in
# process name the repository root (subprocesses get isolated_env(), without ZENML_* variables).
os.environ.setdefault("ZENML_CUSTOM_SOURCE_ROOT", str(ROOT))
# ZenML in this process (steps imported, run configurations validated) reads and writes a global configuration: the
# suite's own, never the developer's ~/.config/zenml and its active stack (subprocesses get isolated_env()'s).
os.environ["ZENML_CONFIG_PATH"] = str(ROOT / ".cache" / "zenml-tests")
os.environ["ZENML_ANALYTICS_OPT_IN"] = "false"


def pytest_configure(config):
    """Create (migrate) that ZenML store once, before pytest-xdist starts its workers: each worker imports the steps,
    which opens the store, and workers that all find no database migrate it at once and fail."""
    if not hasattr(config, "workerinput"):
        from zenml.client import Client

        Client().zen_store  # noqa: B018 - opening the store creates it


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_pytest(tmp_path_factory):
    """This process's temporary files (and its subprocesses') go under the session's pytest folder, of which pytest
    keeps the last three: a leak in a test or a library cannot pile up on a machine that runs the suite every day."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        patch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its first answer
        yield


@pytest.fixture
def scratch_tempdir(tmp_path, monkeypatch) -> Path:
    """An empty folder that this process's tempfile uses for the test: what is left in it afterwards, the code under
    test left behind."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def run_command(args: list, env: dict[str, str], timeout: int, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python *args`` in the repository with ``env`` and a TMPDIR of its own, which the command must leave empty,
    whether it succeeds or fails: scratch files that nobody removes fill the disk of a machine that retrains or scores
    on a schedule."""
    scratch = Path(tempfile.mkdtemp(prefix="command-", dir=env.get("TMPDIR")))
    try:
        result = subprocess.run(
            [sys.executable, *map(str, args)],
            cwd=cwd,
            env=env | {"TMPDIR": str(scratch)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        left = sorted(path.name for path in scratch.iterdir())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert not left, (
        f"{' '.join(map(str, args))} (exit code {result.returncode}) left scratch files behind in its TMPDIR: "
        f"{left}\n{result.stderr[-2000:]}"
    )
    return result


def jpeg_bytes(seed: int, size: int = 32, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small, unique image: different seeds give different bytes."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def dataset_entries(
    root: str = "chest_xray", per_class: int = 3, splits=("train", "test"), start: int = 0
) -> dict[str, bytes]:
    entries, seed = {}, start
    for split in splits:
        for label, pattern in (("NORMAL", "IM-{:04d}-0001.jpeg"), ("PNEUMONIA", "person{}_bacteria_1.jpeg")):
            for _ in range(per_class):
                seed += 1
                entries[f"{root}/{split}/{label}/{pattern.format(seed)}"] = jpeg_bytes(seed)
    return entries


@pytest.fixture
def make_zip(tmp_path):
    counter = {"n": 0}

    def build(entries: dict[str, bytes]) -> Path:
        counter["n"] += 1
        return write_zip(tmp_path / f"archive{counter['n']}.zip", entries)

    return build


def require(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"test data missing: {path} (tests read the real archives from ../shared/data)")
    return path


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without AWS/MLflow/ZenML settings, plus stores under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "ZENML_"))}
    return env | {
        "ZENML_CONFIG_PATH": str(home / "zenml"),
        # No ZenML repository (a .zen folder in the working directory holds an active stack shared by every client
        # that runs there, so parallel tests would switch each other's stacks): the source root is run.py's folder,
        # as in a fresh clone.
        "ZENML_REPOSITORY_PATH": str(home),
        "ZENML_ANALYTICS_OPT_IN": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "XRAY_INFERENCE_RUNTIME": "keras",  # as in this process (above)
        **extra,
    }


def deterministic_smoke_config(path: Path, **section_changes: dict) -> Path:
    """The smoke config with a fixed low threshold.

    One epoch on a few images gives a near-random model, so whether the
    min_sensitivity policy passes the gate would be a coin toss. A fixed
    threshold of 0.02 makes sensitivity 1.0, so the first run's promotion is
    deterministic; the gate's own rules are unit-tested in test_registry_gate.
    """
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "training_smoke.yaml").read_text())
    raw["evaluate"] |= {"threshold_policy": "fixed", "fixed_threshold": 0.02}
    for section, changes in section_changes.items():
        raw[section] = raw.get(section, {}) | changes
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def full_dataset(tmp_path_factory):
    """The full archive, validated as the training pipeline does (seed 42): (dataset, report).

    Built once per test session, also under pytest-xdist: the first worker that needs it validates the archive into
    the session's shared temporary folder under a file lock, the others wait and load what it wrote.
    """
    import fcntl
    import pickle

    from xray.config.data import DataConfig
    from xray.data.dataset import prepare_dataset

    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    folder, done = shared / "full_dataset", shared / "full_dataset.pickle"
    with open(shared / "full_dataset.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            built = prepare_dataset(require(FULL_ZIP), folder / "d", DataConfig(), seed=42)
            done.write_bytes(pickle.dumps(built))
        return pickle.loads(done.read_bytes())


# -- synthetic radiograph-like images and a reference profile fitted on them (monitoring unit tests) --


def one_layer_model(config, weights, mixed_precision=False):
    """A stand-in for xray.model.build_model (same signature and return) with a one-layer backbone: for tests of the
    contract between batches, callbacks and Keras' fit, where ResNet50V2's build and trace would only cost time."""
    import keras

    inputs = keras.Input((config.image_size, config.image_size, 3))
    backbone = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(backbone.output)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled)), backbone


def png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def predictor():
    """A ChestXrayPredictor on 32 px with a tiny model and a reference profile fitted on radiograph-like images."""
    import keras

    from xray.monitoring import ood
    from xray.serving.predictor import ChestXrayPredictor

    rng = np.random.default_rng(0)
    features = [ood.features_of_array(radiograph_like(rng)) for _ in range(80)]
    profile = ood.fit_profile(features[:50], features[50:], np.full(30, 0.4), 0.5)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255.0),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    return ChestXrayPredictor(model, 0.5, 32, "7", profile)


@pytest.fixture(scope="session")
def explainable_predictor(predictor):
    """The test predictor's threshold and size on a model Grad-CAM can explain (a conv layer, "pool" and the
    "probability" head of xray.model.network's classifiers), without a reference profile: every image in scope is ok
    (the profile's synthetic chests find the suite's real radiographs out of distribution)."""
    import keras

    from xray.serving.predictor import ChestXrayPredictor

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(keras.layers.Rescaling(1 / 255.0)(inputs))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="probability")(pooled))
    return ChestXrayPredictor(model, predictor.threshold, 32, predictor.version)


def radiograph_like(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A grey 'chest': a bright body with two dark lungs, position and exposure jittered per image."""
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-((((x - 0.5) / 0.38) ** 2 + ((y - 0.55) / 0.45) ** 2) ** 2))
    lungs = sum(
        np.exp(-(((x - cx - rng.normal(0, 0.02)) / 0.12) ** 2 + ((y - 0.5 - rng.normal(0, 0.02)) / 0.22) ** 2))
        for cx in (0.32, 0.68)
    )
    grey = 40 + 170 * body - 90 * lungs + rng.normal(0, 4, (size, size))
    grey = grey * rng.uniform(0.9, 1.1) + rng.normal(0, 5)
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope="session")
def family():
    """300 images: 0-159 train, 160-219 val of the profile below, 220-299 fresh ones from the same source."""
    rng = np.random.default_rng(0)
    return [radiograph_like(rng) for _ in range(300)]


@pytest.fixture(scope="session")
def profile(family):
    from xray.monitoring import ood

    features = [ood.features_of_array(image) for image in family]
    return ood.fit_profile(features[:160], features[160:220], np.linspace(0, 1, 60), 0.5, alpha=0.01)


# -- the team stack, brought up once per session in its own folder and ports, and one smoke training run on it --
# Used by tests/pipeline/test_team_stack.py (the stack itself: S3, REST APIs, browser, batch inference and serving
# against its MLflow server, restart).


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    team.info = team.stack("up")
    # The client's MLflow calls (tests, `mlflow models serve`) go where the stack's tracker logs, as its account.
    team.env["MLFLOW_TRACKING_URI"] = team.info["mlflow_tracking_uri"]
    team.env |= team.mlflow_account("trainer")
    before = {key: os.environ.get(key) for key in team.mlflow_account("trainer")}
    os.environ.update(team.mlflow_account("trainer"))  # the tests' own MLflow clients, in this process
    try:
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


def twenty_test_images(folder: Path) -> Path:
    """The first twenty test images of the mini archive, as files in ``folder``."""
    folder.mkdir(parents=True)
    with zipfile.ZipFile(MINI_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("chest_xray/test/") and n.endswith(".jpeg"))[:20]
        for name in names:
            (folder / name.rsplit("/", 1)[1]).write_bytes(archive.read(name))
    return folder


@pytest.fixture(scope="session")
def trained(team):
    """One smoke training run on the team stack, which leaves a pending candidate (its trainer account cannot move
    `champion`); the trainer's approval, refused, and the reviewer's, which makes it champion (team.decisions).
    Returns (home, env, twenty test images, the training summary)."""
    home = team.home
    deterministic_smoke_config(home / "smoke.yaml", registry={"require_approval": True})
    summary = team.run("--config", str(home / "smoke.yaml"))
    team.training_stderr = team.last_stderr
    approve = ["approve", "--config", str(home / "smoke.yaml"), "--model-version", summary["model_version"]]
    team.decisions["trainer"] = team.command(*approve, "--reason", "the trainer's own model")
    team.decisions["typed name"] = team.command(
        *approve, "--reviewer", "Dr. Somebody Else", "--reason", "x", account="reviewer"
    )
    team.decisions["reviewer"] = team.run(*approve, "--reason", "smoke model, checked by hand", account="reviewer")
    return home, team.env, twenty_test_images(home / "twenty"), summary


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


# -- one smoke training run on the default local stack (xray-local), shared by the local end-to-end tests --

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
