"""The one prediction path: image bytes -> probability, label, and whether the image is like the training data.

Batch inference (:mod:`xray.serving.batch`), REST serving (:mod:`xray.serving.pyfunc`) and monitoring all predict
through :class:`ChestXrayPredictor`, built from a registered version's folder by :func:`xray.serving.bundle.read`.
The preprocessing is the same :func:`xray.data.images.decode_and_resize` used in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from xray import CLASS_NAMES
from xray.data.images import decode_and_resize, decode_image
from xray.monitoring import ood

OUTPUT_COLUMNS = ["probability", "label", "threshold", "ood_score", "status", "reason", "model_version"]
"""One row per image. ``label`` is empty unless ``status`` is ``ok``: an image out of distribution (or unreadable) keeps
its probability and score, but no answer a client could read as the model's verdict."""


def label_for(probability: float, threshold: float, status: str) -> str:
    """NORMAL or PNEUMONIA at the threshold for an image whose status is ``ok``; empty for any other status."""
    return CLASS_NAMES[int(probability >= threshold)] if status == ood.OK else ""


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
        import tensorflow as tf  # lazy: TensorFlow's import takes seconds

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

    def pixels(self, data: bytes) -> np.ndarray:
        """The model's input for one image, through the preprocessing training used."""
        import tensorflow as tf  # lazy: TensorFlow's import takes seconds

        return decode_and_resize(tf.constant(data), self.image_size).numpy().astype(np.float32)

    def prepare(self, data: bytes) -> PreparedImage:
        """Decode once (PIL) for the check and the out-of-distribution features; the model decodes its own copy."""
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
        import tensorflow as tf  # lazy: TensorFlow's import takes seconds

        return np.asarray(self._forward_encoded(tf.constant(images, dtype=tf.string))).reshape(-1).astype(float)

    def assess(self, features: list[ood.ImageFeatures]) -> pd.DataFrame:
        """ood_score, status and reason per readable image; without a profile every image is ok, unscored."""
        if self.profile is not None:
            return self.profile.assess(features)
        return pd.DataFrame({"ood_score": [float("nan")] * len(features), "status": ood.OK, "reason": ""})

    def rows(self, probabilities: np.ndarray, assessment: pd.DataFrame) -> pd.DataFrame:
        status = assessment["status"].to_numpy()
        return pd.DataFrame(
            {
                "probability": probabilities,
                "label": [label_for(p, self.threshold, s) for p, s in zip(probabilities, status)],
                "threshold": self.threshold,
                "ood_score": assessment["ood_score"].to_numpy(),
                "status": status,
                "reason": assessment["reason"].to_numpy(),
                "model_version": self.version,
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
            table.loc[index] = [np.nan, "", self.threshold, np.nan, ood.UNREADABLE, reason, self.version]
        table = table.sort_index().reset_index(drop=True)
        # JSON has no NaN: an unreadable image has no probability and no score, null in the answer.
        return table.astype(object).where(table.notna(), None)
