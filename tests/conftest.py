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
import zipfile
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

sys.path.insert(0, str(ROOT))
from xray.environment import apply_defaults  # noqa: E402

apply_defaults()


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
        "ZENML_ANALYTICS_OPT_IN": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
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
    """The full archive, validated as the training pipeline does (seed 42): (dataset, report)."""
    from xray.config import DataConfig
    from xray.dataset import prepare_dataset

    return prepare_dataset(require(FULL_ZIP), tmp_path_factory.mktemp("full") / "d", DataConfig(), seed=42)


# -- synthetic radiograph-like images and a reference profile fitted on them (monitoring unit tests) --


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
    from xray import ood

    features = [ood.features_of_array(image) for image in family]
    return ood.fit_profile(features[:160], features[160:220], np.linspace(0, 1, 60), 0.5, alpha=0.01)


# -- the team stack, brought up once per session in its own folder and ports, and one smoke training run on it --
# Shared by tests/pipeline/test_team_stack.py (the stack itself: S3, REST APIs, restart, browser) and
# test_use_the_model.py (batch inference, serving, monitoring and site evaluation against its MLflow server).


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

    def stack(self, command: str, timeout: int = 300) -> dict:
        ports = [f"--{name}-port={port}" for name, port in self.ports.items()]
        return self._json_line(["-m", "infra.team_stack", command, "--state", str(self.state), *ports], timeout)

    def run(self, *args: str, timeout: int = 900) -> dict:
        return self._json_line([str(ROOT / "run.py"), "--stack", "team", *args], timeout)

    def _json_line(self, args: list[str], timeout: int) -> dict:
        """Run this interpreter with ``args`` in the team's environment; its last stdout line, parsed."""
        result = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def team():
    # Not under pytest's tmp folder (mode 0700): as root, PostgreSQL runs as `postgres` and must reach its data.
    (ROOT / ".cache").mkdir(exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="team-test-", dir=ROOT / ".cache"))
    state.chmod(0o755)
    home = state / "client"
    home.mkdir()
    ports = {"zenml": free_port(), "mlflow": free_port(), "s3": free_port(), "pg": free_port()}
    env = isolated_env(home, CHEST_XRAY_ZIP=str(require(MINI_ZIP)))
    team = Team(state / "stack", home, ports, env)
    team.info = team.stack("up")
    # The client's MLflow calls (tests, `mlflow models serve`) go where the stack's tracker logs.
    team.env["MLFLOW_TRACKING_URI"] = team.info["mlflow_tracking_uri"]
    try:
        yield team
    finally:
        team.stack("down")
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def trained(team):
    """One smoke training run on the team stack; (home, env, twenty test images, summary)."""
    home = team.home
    deterministic_smoke_config(home / "smoke.yaml")
    summary = team.run("--config", str(home / "smoke.yaml"))
    images = home / "twenty"
    images.mkdir()
    with zipfile.ZipFile(MINI_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("chest_xray/test/") and n.endswith(".jpeg"))[:20]
        for name in names:
            (images / name.rsplit("/", 1)[1]).write_bytes(archive.read(name))
    return home, team.env, images, summary


@pytest.fixture(scope="session", autouse=True)
def no_store_in_the_repository():
    """MLflow 3 falls back to sqlite:///mlflow.db in the working directory when no tracking URI is set: no test may
    leave such a store (or ./mlruns) in the repository."""
    strays = [ROOT / "mlflow.db", ROOT / "mlruns"]
    before = {path for path in strays if path.exists()}
    yield
    created = [str(path) for path in strays if path.exists() and path not in before]
    assert not created, f"a test wrote an MLflow store into the repository: {created}"
