"""MLflow pyfunc flavor of the registered model: image bytes in, probability and label out.

``mlflow models serve`` and ``mlflow.pyfunc.load_model`` call :func:`_load_pyfunc`
with the model's ``data`` folder, which holds the Keras model, ``serving.json``
(threshold, image size, version) and the version's reference profile
(``reference_profile/``). Batch inference and monitoring load the same folder
through :meth:`ChestXrayPredictor.from_dir`. The preprocessing is the same
:func:`xray.data.decode_and_resize` used in training.

Request body for ``POST /invocations``::

    {"inputs": ["<base64 JPEG or PNG>", ...]}
    {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}

Each image gets ``probability``, ``label``, ``threshold``, ``ood_score`` (1.0 is
the out-of-distribution boundary), ``status`` (``ok``, ``out_of_distribution``
or ``unreadable``) and ``reason``. An out-of-distribution image keeps its
probability, but its label must not be used. A request in which no image can
be read is answered 400.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os

import numpy as np
import pandas as pd

from xray import CLASS_NAMES, ood

CONFIG_FILE = "serving.json"
KERAS_FILE = "model.keras"
PROFILE_DIR = "reference_profile"
OUTPUT_COLUMNS = ["probability", "label", "threshold", "ood_score", "status", "reason"]

logger = logging.getLogger(__name__)


class InvalidImage(ValueError):
    pass


def _payload_items(model_input) -> list:
    if isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, dict):
        return list(np.atleast_1d(model_input.get("image", next(iter(model_input.values())))))
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    return list(np.asarray(model_input, dtype=object).reshape(-1))


def decode_payload(item) -> bytes:
    if isinstance(item, bytes):
        return item
    try:
        return base64.b64decode(str(item), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidImage(f"not base64-encoded image bytes: {error}") from None


class ChestXrayPredictor:
    """The one prediction path: image bytes -> probability, label, and whether the image is like the training data."""

    def __init__(
        self,
        model,
        threshold: float,
        image_size: int,
        version: str | None = None,
        profile: ood.ReferenceProfile | None = None,
    ):
        self.model, self.threshold, self.image_size, self.version = model, threshold, image_size, version
        self.profile = profile

    @classmethod
    def from_dir(cls, data_path: str) -> "ChestXrayPredictor":
        import keras

        with open(os.path.join(data_path, CONFIG_FILE)) as handle:
            config = json.load(handle)
        model = keras.models.load_model(os.path.join(data_path, KERAS_FILE))
        profile_path = os.path.join(data_path, PROFILE_DIR)
        profile = ood.ReferenceProfile.load(profile_path) if os.path.isdir(profile_path) else None
        if profile is None:
            logger.warning(
                "model version %s has no reference profile (registered before profiles existed): "
                "ood_score is empty and no image is checked for being out of distribution",
                config.get("version", "?"),
            )
        return cls(model, float(config["threshold"]), int(config["image_size"]), config.get("version"), profile)

    def pixels(self, data: bytes) -> np.ndarray:
        """The model's input for one image, through the preprocessing training used."""
        import tensorflow as tf

        from xray.data import decode_and_resize

        return decode_and_resize(tf.constant(data), self.image_size).numpy().astype(np.float32)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros(0)
        return self.model.predict(batch, verbose=0).reshape(-1).astype(float)

    def assess(self, features: list[ood.ImageFeatures]) -> pd.DataFrame:
        """ood_score, status and reason per readable image; without a profile every image is ok, unscored."""
        if self.profile is not None:
            return self.profile.assess(features)
        return pd.DataFrame({"ood_score": [float("nan")] * len(features), "status": ood.OK, "reason": ""})

    def rows(self, probabilities: np.ndarray, assessment: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "probability": probabilities,
                "label": [CLASS_NAMES[int(p >= self.threshold)] for p in probabilities],
                "threshold": self.threshold,
                "ood_score": assessment["ood_score"].to_numpy(),
                "status": assessment["status"].to_numpy(),
                "reason": assessment["reason"].to_numpy(),
            },
            columns=OUTPUT_COLUMNS,
        )

    def predict_bytes(self, images: list[bytes]) -> pd.DataFrame:
        """One row per image, in order; an image that cannot be decoded gets status unreadable and no probability."""
        from xray.manifest import check_image

        readable, features, pixels, unreadable = [], [], [], {}
        for index, data in enumerate(images):
            check = check_image(data)
            if not check.ok:
                unreadable[index] = check.reason
                continue
            content = check.converted if check.converted is not None else data
            readable.append(index)
            features.append(ood.features_of_bytes(content))
            pixels.append(self.pixels(content))
        batch = np.stack(pixels) if pixels else np.zeros((0, self.image_size, self.image_size, 3), np.float32)
        table = self.rows(self.probabilities(batch), self.assess(features))
        table.index = readable
        for index, reason in unreadable.items():
            table.loc[index] = [np.nan, "", self.threshold, np.nan, ood.UNREADABLE, reason]
        table = table.sort_index().reset_index(drop=True)
        # JSON has no NaN: an unreadable image has no probability and no score, null in the answer.
        return table.astype(object).where(table.notna(), None)

    def predict(self, model_input, params=None) -> pd.DataFrame:
        items = _payload_items(model_input)
        if not items:
            raise InvalidImage("no images in the request")
        table = self.predict_bytes([decode_payload(item) for item in items])
        if (table["status"] == ood.UNREADABLE).all():
            raise InvalidImage(
                "; ".join(
                    f"image {i} cannot be decoded as an image: {reason}" for i, reason in enumerate(table["reason"])
                )
            )
        return table


class _PyfuncModel:
    """What mlflow.pyfunc wraps; turns bad input into a 400, not a 500."""

    def __init__(self, predictor: ChestXrayPredictor):
        self.predictor = predictor

    def predict(self, model_input, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self.predictor.predict(model_input, params)
        except InvalidImage as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None


def _load_pyfunc(data_path: str) -> _PyfuncModel:
    return _PyfuncModel(ChestXrayPredictor.from_dir(data_path))
