"""A registered version's folder: what :func:`write` puts beside the Keras model and :func:`read` loads back.

    data/model.keras             the calibrated Keras model (written by the keras flavor)
    data/serving.json            threshold, image size, preprocessing, the validated scope
                                 (xray.config.scope.ScopeConfig),
                                 the sites' own operating points fitted at training
    operating_points.json        (optional, beside data/) sites' operating points re-fitted later by
                                 ``--pipeline evaluation --recalibrate-fraction`` (xray.registry.store)
    data/reference_profile/      the out-of-distribution reference (xray.monitoring.ood.ReferenceProfile)
    data/int8/                   (optional) the int8 OpenVINO model (model.xml, model.bin) that passed its val
                                 accuracy control, and that control's figures and recipe (int8.json;
                                 xray.serving.runtimes.int8); ``inference.runtime: auto`` runs it (against bf16 where the
                                 CPU has BF16: the faster in a warm-up)
    code/xray/                   this package, so the pyfunc flavor loads without the project installed
    files.sha256                 the SHA-256 of every other file but the card, as ``sha256sum`` writes them (written
                                 at registration; its own SHA-256 is the version's tag ``model_sha256``)

Batch inference, monitoring, the gate and REST serving all read this one folder, so they cannot disagree; each
checks it against the version's digest first (:func:`verify`). :class:`KerasFlavor` is how MLflow writes it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shutil
import unicodedata
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

import xray
from xray.config.scope import ScopeConfig
from xray.errors import XrayError
from xray.monitoring.ood import ReferenceProfile
from xray.monitoring.scope import describe
from xray.serving.predictor import NUMERIC_COLUMNS, OUTPUT_COLUMNS, ChestXrayPredictor
from xray.serving.runtimes import int8
from xray.serving.runtimes.int8 import Int8Outcome

CONFIG_FILE = "serving.json"
OPERATING_POINTS_FILE = "operating_points.json"
KERAS_FILE = "model.keras"
PROFILE_DIR = "reference_profile"
INT8_DIR, INT8_MODEL, INT8_FIGURES = "int8", int8.MODEL_FILE, int8.FIGURES_FILE
DATA_DIR, CODE_DIR = "data", "code"
MANIFEST_FILE, CARD_FILE = "files.sha256", "model_card.md"
NOT_DIGESTED = (MANIFEST_FILE, CARD_FILE, "registered_model_meta")
"""The file list itself; the card: decisions append to it, and its authoritative copy is the registry's description,
which only a reviewer may change; and what MLflow adds to a downloaded copy (the name and number it was fetched as)."""
LOADER_MODULE = "xray.serving.pyfunc"
"""The pyfunc flavor's loader. Versions registered before the stages name ``xray.serving``, which re-exports it."""

logger = logging.getLogger(__name__)


@dataclass
class VersionFiles:
    """What a version's folder is made of besides its serving config: the calibrated Keras ``model``, its
    out-of-distribution ``reference_profile`` and its ``int8`` outcome (xray.serving.runtimes.int8.Int8Outcome; None
    where none was made)."""

    model: Any
    reference_profile: ReferenceProfile
    int8: Int8Outcome | None = None


def write(folder: str | Path, serving: dict, files: VersionFiles) -> dict:
    """Add the serving config, the reference profile, the int8 outcome and the code to a model folder whose ``data/``
    holds the Keras model; returns the ``python_function`` flavor's settings that load it."""
    folder = Path(folder)
    (folder / DATA_DIR).mkdir(parents=True, exist_ok=True)
    (folder / DATA_DIR / CONFIG_FILE).write_text(json.dumps(serving))
    files.reference_profile.save(folder / DATA_DIR / PROFILE_DIR)
    if files.int8 is not None and files.int8.made:
        write_int8(folder / DATA_DIR, files.int8)
    # The whole package, not the folder of this module: the loader imports the predictor, the decoding, the checks.
    package = Path(xray.__file__).parent
    shutil.copytree(package, folder / CODE_DIR / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    return {"loader_module": LOADER_MODULE, "data": DATA_DIR, "code": CODE_DIR}


def write_int8(data_path: str | Path, outcome: Int8Outcome) -> Path:
    """Store an int8 outcome in a version's ``data/`` before its file list is made (xray.serving.runtimes.int8.save:
    the model where it passed the control, its figures and recipe either way). The figures' path."""
    int8.save(outcome, Path(data_path) / INT8_DIR)
    return Path(data_path) / INT8_DIR / INT8_FIGURES


def read(data_path: str | Path) -> ChestXrayPredictor:
    """The predictor of a version's ``data/`` folder: its Keras model, threshold, image size and reference profile."""
    import keras  # lazy: TensorFlow's import costs seconds, and only loading a model needs it

    with open(os.path.join(data_path, CONFIG_FILE)) as handle:
        config = json.load(handle)
    model = keras.models.load_model(os.path.join(data_path, KERAS_FILE))
    profile_path = os.path.join(data_path, PROFILE_DIR)
    profile = ReferenceProfile.load(profile_path) if os.path.isdir(profile_path) else None
    if profile is None:
        logger.warning(
            "model version %s has no reference profile (registered before profiles existed): "
            "ood_score is empty and no image is checked for being out of distribution",
            config.get("version", "?"),
        )
    if "scope" not in config:
        logger.warning(
            "model version %s has no stored scope (registered before DICOM scope checks): DICOM headers are checked "
            "against the default scope, that of the training data (%s)",
            config.get("version", "?"),
            "; ".join(describe(ScopeConfig())),
        )
    scope = ScopeConfig.model_validate(config.get("scope", {}))
    points = dict(config.get("operating_points") or {})
    later = os.path.join(os.path.dirname(os.path.abspath(data_path)), OPERATING_POINTS_FILE)
    if os.path.isfile(later):
        with open(later) as handle:
            points |= json.load(handle)
    predictor = ChestXrayPredictor(
        model, float(config["threshold"]), int(config["image_size"]), config.get("version"), profile, scope, points
    )
    int8 = Path(data_path, INT8_DIR, INT8_MODEL)
    if int8.is_file():  # versions without int8 run as before
        predictor.int8_ir = (int8.read_bytes(), int8.with_suffix(".bin").read_bytes())
    return predictor


class ModelIntegrityError(XrayError):
    """A version's files differ from the digest recorded when it was registered."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listable(relative: str) -> bool:
    """Whether the list can hold a file name on one line: no line break, no control or separator character."""
    return relative == relative.strip() and not any(
        unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in relative
    )


def manifest(folder: str | Path) -> str:
    """``sha256sum`` lines (``<hex>  <path>``) of every file of a version folder but :data:`NOT_DIGESTED`, sorted by
    path: ``sha256sum -c files.sha256`` checks a downloaded copy by hand. A symbolic link is refused."""
    folder = Path(folder)
    found = sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    if any(p.is_symlink() for p in found):
        raise ModelIntegrityError(
            f"a file of the version is a symbolic link: {next(p for p in found if p.is_symlink())}"
        )
    names = [(p, p.relative_to(folder).as_posix()) for p in found]
    for _, name in names:
        if not _listable(name):
            raise ModelIntegrityError(f"a file of the version has a name no file list can hold: {name!r}")
    return "".join(f"{file_sha256(p)}  {name}\n" for p, name in names if name not in NOT_DIGESTED)


def digest(manifest_text: str) -> str:
    """The version's one digest: the SHA-256 of its file list."""
    return hashlib.sha256(manifest_text.encode()).hexdigest()


def verify(folder: str | Path, manifest_text: str, expected: str, version: str, prefix: str = "") -> None:
    """Check ``folder`` (the version's folder, its subfolder ``prefix`` ending in ``/``, or its one file ``prefix``)
    against the file list whose digest the registry recorded; raise :class:`ModelIntegrityError` naming the version and the first file that differs."""

    def refuse(why: str) -> None:
        raise ModelIntegrityError(
            f"model version {version} refused: {why}; its files changed after registration (recorded digest "
            f"{expected[:12]}). Register and approve a new version"
        )

    if digest(manifest_text) != expected:
        refuse(f"its file list {MANIFEST_FILE} does not match the digest recorded in the registry")
    listed = {}
    for line in manifest_text.split("\n")[:-1] if manifest_text.endswith("\n") else [manifest_text]:
        hex_digest, _, relative = line.partition("  ")
        if len(hex_digest) != 64 or not relative or not _listable(relative) or relative in NOT_DIGESTED:
            refuse(f"its file list {MANIFEST_FILE} has a line that is not one file's")
        if relative.startswith(prefix):
            if relative[len(prefix) :] in listed:
                refuse(f"its file list {MANIFEST_FILE} lists {relative} twice")
            listed[relative[len(prefix) :]] = hex_digest
    folder = Path(folder)
    found = (
        {"": folder}
        if folder.is_file()
        else {
            p.relative_to(folder).as_posix(): p
            for p in folder.rglob("*")
            if (p.is_file() or p.is_symlink()) and (prefix + p.relative_to(folder).as_posix()) not in NOT_DIGESTED
        }
    )
    for relative in sorted(set(listed) | set(found)):
        if relative not in found:
            refuse(f"{prefix}{relative} is missing")
        if relative not in listed:
            refuse(f"{prefix}{relative} is not one of its files")
        if found[relative].is_symlink() or file_sha256(found[relative]) != listed[relative]:
            refuse(f"{prefix}{relative} differs from the file registered")


# -- how MLflow writes the folder: the Keras flavor plus the serving flavor, its signature and requirements --

# TensorFlow installs under several distribution names: tensorflow-cpu here, tensorflow on the GPU image.
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tensorflow-intel")
# scikit-learn and scipy: the reference profile scores every request (xray.ood).
RUNTIME_DISTRIBUTIONS = ("keras", "mlflow", "pillow", "numpy", "scikit-learn", "scipy")


def pip_requirements(installed=version) -> list[str]:
    """Pinned from what is installed, TensorFlow under whichever name it was installed; MLflow's inference would
    load TF in a subprocess. ``installed``: distribution name -> version, raising PackageNotFoundError."""

    def pin(name: str) -> str | None:
        try:
            return f"{name}=={installed(name)}"
        except PackageNotFoundError:
            return None

    tensorflow = next(filter(None, map(pin, TENSORFLOW_DISTRIBUTIONS)), None)
    if tensorflow is None:
        raise RuntimeError(
            f"no TensorFlow distribution installed (looked for {', '.join(TENSORFLOW_DISTRIBUTIONS)}): "
            "the registered model would have no TensorFlow requirement"
        )
    pins = [tensorflow]
    for name in RUNTIME_DISTRIBUTIONS:
        pinned = pin(name)
        if pinned is None:
            raise RuntimeError(f"{name} is not installed, but the registered model needs it at inference")
        pins.append(pinned)
    return pins


class KerasFlavor:
    """mlflow.keras, plus this project's serving flavor and model card in the same model directory.

    - mlflow 3.17's keras ``save_model`` writes ``input_example.json`` into a
      directory it only creates afterwards, and accepts only tensor signatures;
      the signature and input example here describe the serving interface
      (base64 image strings), so they are added after the Keras flavor is saved.
    - The ``python_function`` flavor is pointed at :mod:`xray.serving.pyfunc` (the
      package is shipped in the model's ``code/``; :mod:`xray.serving.bundle`), so
      ``mlflow models serve`` takes image bytes and applies the recorded
      preprocessing and threshold, while ``mlflow.keras.load_model`` still returns
      the Keras model.
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path, mlflow_model, serving: dict, model_card: str, signature, input_example, files, **kwargs):
        import mlflow.keras  # lazy: MLflow's import costs seconds, and only registration needs it here
        from mlflow.models.utils import _save_example  # lazy: as above; what MLflow's own flavors call

        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        mlflow_model.signature = signature
        _save_example(mlflow_model, input_example, path)
        mlflow_model.flavors["python_function"].update(write(path, serving, files))
        mlflow_model.save(os.path.join(path, "MLmodel"))
        Path(path, "model_card.md").write_text(model_card)


def serving_signature():
    from mlflow.models import ModelSignature  # lazy: MLflow's import takes seconds
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema  # lazy: MLflow's import takes seconds

    kinds = dict.fromkeys(NUMERIC_COLUMNS, "double")
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec(kinds.get(name, "string"), name) for name in OUTPUT_COLUMNS]),
        # A request's site (its own operating point); empty: the version's.
        params=ParamSchema([ParamSpec("site", "string", "")]),
    )


def example_request() -> pd.DataFrame:
    """A real (synthetic, gray) JPEG, base64-encoded, as the serving input example."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, dtype=np.uint8)).convert("RGB").save(buffer, format="JPEG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]})
