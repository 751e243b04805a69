"""A registered version's folder: what :func:`write` puts beside the Keras model and :func:`read` loads back.

    data/model.keras             the calibrated Keras model (written by the keras flavor)
    data/serving.json            threshold, image size, preprocessing, the validated scope (xray.config.ScopeConfig),
                                 the sites' own operating points fitted at training
    operating_points.json        (optional, beside data/) sites' operating points re-fitted later by
                                 ``--pipeline evaluation --recalibrate-fraction`` (xray.registry.store)
    data/reference_profile/      the out-of-distribution reference (xray.monitoring.ood.ReferenceProfile)
    code/xray/                   this package, so the pyfunc flavor loads without the project installed

Batch inference, monitoring, the gate and REST serving all read this one folder, so they cannot disagree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import xray
from xray.config import ScopeConfig
from xray.monitoring.ood import ReferenceProfile
from xray.monitoring.scope import describe
from xray.serving.predictor import ChestXrayPredictor

CONFIG_FILE = "serving.json"
OPERATING_POINTS_FILE = "operating_points.json"
KERAS_FILE = "model.keras"
PROFILE_DIR = "reference_profile"
DATA_DIR, CODE_DIR = "data", "code"
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
