"""What the tests share that is not a fixture: the repository's paths and the shared data, commands run as a user
runs them, and small synthetic images and archives. Imported by name (``from support import ROOT``); the fixtures
are in the conftest.py of each layer."""

from __future__ import annotations

import functools
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Files that share a session fixture too long to build twice: under --dist loadfile (make test) they go to one worker
# as one unit, in their order (tests/conftest.py pytest_xdist_make_scheduler). The local stack's smoke training (the
# `local` fixture, 40 s of a worker) serves both.
SHARED_WORKER = {"tests/pipelines/test_local_stack_serving.py": "tests/pipelines/test_local_stack.py"}
SHARED_DATA = ROOT.parent / "shared" / "data"
MINI_ZIP = SHARED_DATA / "chest_xray_mini.zip"
FULL_ZIP = SHARED_DATA / "chest_xray_224.zip"
NEAR_OOD_ZIP = SHARED_DATA / "near_ood_adult_cxr_224.zip"


def run_command(args: list, env: dict[str, str], timeout: int, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python *args`` in the repository with ``env`` and a TMPDIR of its own, which the command must leave empty,
    whether it succeeds or fails: scratch files that nobody removes fill the disk of a machine that retrains or scores
    on a schedule. Forked from a server that has the libraries imported where that cannot change what the command
    does (forked.py), else a fresh interpreter."""
    from forked import SERVER

    scratch = Path(tempfile.mkdtemp(prefix="command-", dir=env.get("TMPDIR")))
    args, env = [str(arg) for arg in args], env | {"TMPDIR": str(scratch)}
    try:
        if SERVER.can_run(args, env):
            result = SERVER.run(args, env, timeout, cwd)
        else:
            result = subprocess.run(
                [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
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


def require(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"test data missing: {path} (tests read the real archives from ../shared/data)")
    return path


@functools.cache
def _mlflow_schema() -> Path:
    """A migrated MLflow database, emptied of experiments (mlflow_store copies it): made once per MLflow version under
    .cache (MLflow's migrations cost about 1.4 s, which every worker of the suite paid), and published by a rename so
    that workers that make it at once each read a whole one."""
    import sqlite3
    from importlib.metadata import version

    from mlflow.tracking import MlflowClient

    schema = ROOT / ".cache" / "mlflow-schema" / f"mlflow-{version('mlflow')}.db"
    if not schema.is_file():
        schema.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix="mlflow-schema-", dir=schema.parent)) / "mlflow.db"
        MlflowClient(f"sqlite:///{building}").search_experiments()  # creates and migrates it
        with sqlite3.connect(building) as database:
            database.execute("DELETE FROM experiments")
        database.close()
        os.replace(building, schema)
        shutil.rmtree(building.parent)
    return schema


def mlflow_store(folder: Path) -> str:
    """The URI of a SQLite MLflow store at ``folder/mlflow.db``, its schema already migrated: a copy of an empty one
    this process made once (MLflow's migrations cost about a second per new database, and the suite makes hundreds).
    The copy holds no experiment: MLflow creates its Default experiment on first use, under the user's working
    directory, as in a new database. An existing store is left as it is."""
    target = folder / "mlflow.db"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_mlflow_schema(), target)
    return f"sqlite:///{target}"


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
        "MLFLOW_TRACKING_URI": mlflow_store(home),
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_reporting(monkeypatch, capabilities: list[str]) -> None:
    """A CPU whose OpenVINO capabilities are ``capabilities``, no GPU, no runtime from the environment."""
    import openvino
    import tensorflow as tf

    class Core(openvino.Core):
        def get_property(self, device, name):
            return capabilities if name == "OPTIMIZATION_CAPABILITIES" else super().get_property(device, name)

    monkeypatch.delenv("XRAY_INFERENCE_RUNTIME", raising=False)
    monkeypatch.setattr(openvino, "Core", Core)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: [])
