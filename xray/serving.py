"""MLflow pyfunc flavor of the registered model: image bytes in, probability and label out.

``mlflow models serve`` and ``mlflow.pyfunc.load_model`` call :func:`_load_pyfunc`
with the model's ``data`` folder, which holds the Keras model and
``serving.json`` (threshold, image size, version). The preprocessing is the
same :func:`xray.data.decode_and_resize` used in training.

Request body for ``POST /invocations``::

    {"inputs": ["<base64 JPEG or PNG>", ...]}
    {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}
"""

from __future__ import annotations

import base64
import binascii
import json
import os

import numpy as np
import pandas as pd

from xray import CLASS_NAMES

CONFIG_FILE = "serving.json"
KERAS_FILE = "model.keras"


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
    def __init__(self, model, threshold: float, image_size: int, version: str | None = None):
        self.model, self.threshold, self.image_size, self.version = model, threshold, image_size, version

    @classmethod
    def from_dir(cls, data_path: str) -> "ChestXrayPredictor":
        import keras

        with open(os.path.join(data_path, CONFIG_FILE)) as handle:
            config = json.load(handle)
        model = keras.models.load_model(os.path.join(data_path, KERAS_FILE))
        return cls(model, float(config["threshold"]), int(config["image_size"]), config.get("version"))

    def pixels(self, data: bytes, index: int) -> np.ndarray:
        import tensorflow as tf

        from xray.data import decode_and_resize

        try:
            return decode_and_resize(tf.constant(data), self.image_size).numpy().astype(np.float32)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
            raise InvalidImage(f"image {index} cannot be decoded as JPEG or PNG: {error.message.splitlines()[0]}") from None

    def predict(self, model_input, params=None) -> pd.DataFrame:
        items = _payload_items(model_input)
        if not items:
            raise InvalidImage("no images in the request")
        batch = np.stack([self.pixels(decode_payload(item), i) for i, item in enumerate(items)])
        probability = self.model.predict(batch, verbose=0).reshape(-1).astype(float)
        return pd.DataFrame({
            "probability": probability,
            "label": [CLASS_NAMES[int(p >= self.threshold)] for p in probability],
            "threshold": self.threshold,
        })


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
