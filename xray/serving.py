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
probability, but its label must not be used.

Requests are refused with a 400 and a message, never a 500: a body that is not
JSON, a payload that is not one base64 string per image (``{"inputs": {...}}``,
nested lists, numbers), an empty list, a request in which no image can be read,
more than ``MAX_IMAGES_PER_REQUEST`` images, or more than ``MAX_REQUEST_MB`` of
image data (set with ``XRAY_SERVING_MAX_REQUEST_MB``). The scoring server reads
the whole body before the model sees it; a hard cap on bytes on the wire belongs
in the proxy in front (nginx ``client_max_body_size``, an ALB or API Gateway limit).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from xray import CLASS_NAMES, ood

CONFIG_FILE = "serving.json"
KERAS_FILE = "model.keras"
PROFILE_DIR = "reference_profile"
OUTPUT_COLUMNS = ["probability", "label", "threshold", "ood_score", "status", "reason"]

logger = logging.getLogger(__name__)


MAX_IMAGES_PER_REQUEST = 64
MAX_REQUEST_MB = float(os.environ.get("XRAY_SERVING_MAX_REQUEST_MB", "16"))
SHAPE_HELP = 'send {"inputs": ["<base64 image>", ...]}: one base64 string per image'


class InvalidImage(ValueError):
    pass


def _payload_items(model_input) -> list:
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            return list(model_input["image"])
        if model_input.shape[1] != 1:
            raise InvalidImage(f"expected one image column, got columns {list(model_input.columns)[:5]}; {SHAPE_HELP}")
        return list(model_input.iloc[:, 0])
    if isinstance(model_input, dict):
        for key in ("image", "inputs"):
            if key in model_input:
                return _payload_items(model_input[key])
        if len(model_input) == 1:
            return _payload_items(next(iter(model_input.values())))
        raise InvalidImage(
            f"expected a list of images, got an object with keys {sorted(model_input)[:5]}; {SHAPE_HELP}"
        )
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    array = np.asarray(model_input, dtype=object)
    if array.ndim != 1:
        raise InvalidImage(f"expected a flat list of images, got an array of shape {array.shape}; {SHAPE_HELP}")
    return list(array)


def decode_payload(item, index: int = 0) -> bytes:
    if isinstance(item, bytes):
        return item
    if not isinstance(item, str):
        raise InvalidImage(f"image {index} is a {type(item).__name__}, not a base64 string; {SHAPE_HELP}")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidImage(f"image {index} is not base64-encoded image bytes: {error}") from None


def check_request_size(items: list) -> None:
    """Refuse a request over the documented limits before decoding any image."""
    if not items:
        raise InvalidImage(f"no images in the request; {SHAPE_HELP}")
    if len(items) > MAX_IMAGES_PER_REQUEST:
        raise InvalidImage(
            f"{len(items)} images in one request, over the limit of {MAX_IMAGES_PER_REQUEST}; split the batch"
        )
    size = sum(len(item) for item in items if isinstance(item, (str, bytes)))
    if size > MAX_REQUEST_MB * 2**20:
        raise InvalidImage(
            f"{size / 2**20:.1f} MB of image data in one request, over the limit of {MAX_REQUEST_MB:g} MB "
            "(XRAY_SERVING_MAX_REQUEST_MB); send fewer or smaller images"
        )


@dataclass
class PreparedImage:
    """One image screened for the model: the decoder's reason when unreadable, else its out-of-distribution features
    and the encoded bytes the model decodes (PNG when the original had to be converted)."""

    reason: str = ""
    features: ood.ImageFeatures | None = None
    encoded: bytes | None = None

    @property
    def readable(self) -> bool:
        return self.encoded is not None


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
        import tensorflow as tf

        from xray.data import decode_and_resize

        self.model, self.threshold, self.image_size, self.version = model, threshold, image_size, version
        self.profile = profile
        # Traced once for every batch size: a call pays for the arithmetic, not model.predict's per-call setup (data
        # adapter, callbacks, a step function per shape). The encoded variant also decodes and resizes inside the
        # graph, on TensorFlow's threads, with the preprocessing training used.
        self._forward = tf.function(
            lambda batch: model(batch, training=False),
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)],
        )

        def decode(data):
            return tf.cast(decode_and_resize(data, image_size), tf.float32)

        self._forward_encoded = tf.function(
            lambda encoded: model(tf.map_fn(decode, encoded, fn_output_signature=tf.float32), training=False),
            input_signature=[tf.TensorSpec([None], tf.string)],
        )

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

    def prepare(self, data: bytes) -> PreparedImage:
        """Decode once (PIL) for the check and the out-of-distribution features; the model decodes its own copy."""
        from xray.manifest import decode_image

        check, image = decode_image(data)
        if not check.ok:
            return PreparedImage(reason=check.reason)
        return PreparedImage(features=ood.features_of(image), encoded=check.converted or data)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """P(PNEUMONIA) for a batch of preprocessed images (N, size, size, 3)."""
        if len(batch) == 0:
            return np.zeros(0)
        return np.asarray(self._forward(np.asarray(batch, dtype=np.float32))).reshape(-1).astype(float)

    def probabilities_of_encoded(self, images: list[bytes]) -> np.ndarray:
        """P(PNEUMONIA) for encoded images (JPEG or PNG bytes): decode, resize and model in one compiled call."""
        if not images:
            return np.zeros(0)
        import tensorflow as tf

        return np.asarray(self._forward_encoded(tf.constant(images, dtype=tf.string))).reshape(-1).astype(float)

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
        readable, features, encoded, unreadable = [], [], [], {}
        for index, data in enumerate(images):
            prepared = self.prepare(data)
            if not prepared.readable:
                unreadable[index] = prepared.reason
                continue
            readable.append(index)
            features.append(prepared.features)
            encoded.append(prepared.encoded)
        table = self.rows(self.probabilities_of_encoded(encoded), self.assess(features))
        table.index = readable
        for index, reason in unreadable.items():
            table.loc[index] = [np.nan, "", self.threshold, np.nan, ood.UNREADABLE, reason]
        table = table.sort_index().reset_index(drop=True)
        # JSON has no NaN: an unreadable image has no probability and no score, null in the answer.
        return table.astype(object).where(table.notna(), None)

    def predict(self, model_input, params=None) -> pd.DataFrame:
        items = _payload_items(model_input)
        check_request_size(items)
        table = self.predict_bytes([decode_payload(item, index) for index, item in enumerate(items)])
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
