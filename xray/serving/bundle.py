"""A registered version's folder: what :func:`write` puts beside the Keras model and :func:`read` loads back.

    data/model.keras             the calibrated Keras model (written by the keras flavor)
    data/serving.json            threshold, image size, preprocessing, the validated scope (xray.config.ScopeConfig),
                                 the sites' own operating points fitted at training
    operating_points.json        (optional, beside data/) sites' operating points re-fitted later by
                                 ``--pipeline evaluation --recalibrate-fraction`` (xray.registry.store)
    data/reference_profile/      the out-of-distribution reference (xray.monitoring.ood.ReferenceProfile)
    code/xray/                   this package, so the pyfunc flavor loads without the project installed
    files.sha256                 the SHA-256 of every other file but the card, as ``sha256sum`` writes them (written
                                 at registration; its own SHA-256 is the version's tag ``model_sha256``)

Batch inference, monitoring, the gate and REST serving all read this one folder, so they cannot disagree; each
checks it against the version's digest first (:func:`verify`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import xray
from xray.config import ScopeConfig
from xray.errors import XrayError
from xray.monitoring.ood import ReferenceProfile
from xray.monitoring.scope import describe
from xray.serving.predictor import ChestXrayPredictor

CONFIG_FILE = "serving.json"
OPERATING_POINTS_FILE = "operating_points.json"
KERAS_FILE = "model.keras"
PROFILE_DIR = "reference_profile"
DATA_DIR, CODE_DIR = "data", "code"
MANIFEST_FILE, CARD_FILE = "files.sha256", "model_card.md"
NOT_DIGESTED = (MANIFEST_FILE, CARD_FILE, "registered_model_meta")
"""The file list itself; the card: decisions append to it, and its authoritative copy is the registry's description,
which only a reviewer may change; and what MLflow adds to a downloaded copy (the name and number it was fetched as)."""
LOADER_MODULE = "xray.serving.pyfunc"
"""The pyfunc flavor's loader. Versions registered before the stages name ``xray.serving``, which re-exports it."""

logger = logging.getLogger(__name__)


def write(folder: str | Path, serving: dict, reference_profile: ReferenceProfile) -> dict:
    """Add the serving config, the reference profile and the code to a model folder whose ``data/`` holds the Keras
    model; returns the ``python_function`` flavor's settings that load it."""
    folder = Path(folder)
    (folder / DATA_DIR).mkdir(parents=True, exist_ok=True)
    (folder / DATA_DIR / CONFIG_FILE).write_text(json.dumps(serving))
    reference_profile.save(folder / DATA_DIR / PROFILE_DIR)
    # The whole package, not the folder of this module: the loader imports the predictor, the decoding, the checks.
    package = Path(xray.__file__).parent
    shutil.copytree(package, folder / CODE_DIR / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    return {"loader_module": LOADER_MODULE, "data": DATA_DIR, "code": CODE_DIR}


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
    return ChestXrayPredictor(
        model, float(config["threshold"]), int(config["image_size"]), config.get("version"), profile, scope, points
    )


class ModelIntegrityError(XrayError):
    """A version's files differ from the digest recorded when it was registered."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: str | Path) -> str:
    """``sha256sum`` lines (``<hex>  <path>``) of every file of a version folder but :data:`NOT_DIGESTED`, sorted by
    path: ``sha256sum -c files.sha256`` checks a downloaded copy by hand."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in NOT_DIGESTED)
    return "".join(f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)


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
    for line in manifest_text.splitlines():
        hex_digest, _, relative = line.partition("  ")
        if relative.startswith(prefix):
            listed[relative[len(prefix) :]] = hex_digest
    folder = Path(folder)
    found = (
        {"": folder}
        if folder.is_file()
        else {
            p.relative_to(folder).as_posix(): p
            for p in folder.rglob("*")
            if p.is_file() and (prefix + p.relative_to(folder).as_posix()) not in NOT_DIGESTED
        }
    )
    for relative in sorted(set(listed) | set(found)):
        if relative not in found:
            refuse(f"{prefix}{relative} is missing")
        if relative not in listed:
            refuse(f"{prefix}{relative} is not one of its files")
        if file_sha256(found[relative]) != listed[relative]:
            refuse(f"{prefix}{relative} differs from the file registered")
