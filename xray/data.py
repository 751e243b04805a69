"""tf.data input pipelines and the one image preprocessing every path shares.

Training, evaluation, batch inference and serving all call
:func:`decode_and_resize`, so the pixels the model sees cannot drift between
them. The model itself takes raw RGB values in [0, 255]; backbone-specific
scaling lives inside the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from xray import CLASS_NAMES
from xray import manifest as mf
from xray.config import Augmentation

PREPROCESSING = "decode_image(channels=3) -> resize(image_size, bilinear, antialias) -> round to uint8 -> float32 in [0, 255]"


class DatasetSpec(BaseModel):
    """Everything the trainer needs to rebuild the same input pipelines anywhere."""

    model_config = ConfigDict(frozen=True)

    image_size: int
    batch_size: int
    augmentation: Augmentation
    class_weights: dict[int, float]
    max_train_per_class: int | None
    max_eval_per_class: int | None
    seed: int
    counts: dict[str, dict[str, int]]
    preprocessing: str = PREPROCESSING


def select(manifest: pd.DataFrame, split: str, spec: DatasetSpec) -> pd.DataFrame:
    cap = spec.max_train_per_class if split == "train" else spec.max_eval_per_class
    return mf.sample(manifest, split, cap, spec.seed)


def labels_of(rows: pd.DataFrame) -> np.ndarray:
    return (rows["label"] == CLASS_NAMES[1]).to_numpy(dtype=np.float32)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """'Balanced' weights n / (2 * n_c): each class contributes equally to the loss."""
    n = len(labels)
    positives = float(labels.sum())
    counts = {0: n - positives, 1: positives}
    return {c: (n / (2.0 * k) if k else 0.0) for c, k in counts.items()}


def make_spec(manifest: pd.DataFrame, image_size: int, batch_size: int, augmentation: Augmentation,
              max_train_per_class: int | None, max_eval_per_class: int | None, seed: int,
              weighting: bool = True) -> DatasetSpec:
    spec = DatasetSpec(
        image_size=image_size, batch_size=batch_size, augmentation=augmentation, class_weights={0: 1.0, 1: 1.0},
        max_train_per_class=max_train_per_class, max_eval_per_class=max_eval_per_class, seed=seed, counts={},
    )
    rows = {split: select(manifest, split, spec) for split in ("train", "val", "test")}
    counts = {split: {label: int((r["label"] == label).sum()) for label in CLASS_NAMES} for split, r in rows.items()}
    weights = class_weights(labels_of(rows["train"])) if weighting else {0: 1.0, 1: 1.0}
    return spec.model_copy(update={"class_weights": weights, "counts": counts})


def decode_and_resize(data: Any, image_size: int):
    """Encoded bytes (JPEG, PNG, BMP, GIF; detected by content) -> uint8 HxWx3."""
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def augmenter(config: Augmentation, seed: int):
    """Keras preprocessing layers applied per batch on the CPU side of tf.data."""
    import keras

    layers = []
    if config.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if config.rotation:
        layers.append(keras.layers.RandomRotation(config.rotation, fill_mode="constant", seed=seed))
    if config.zoom:
        layers.append(keras.layers.RandomZoom((-config.zoom, config.zoom), fill_mode="constant", seed=seed))
    if config.contrast:
        layers.append(keras.layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed))
    if config.brightness:
        layers.append(keras.layers.RandomBrightness(config.brightness, value_range=(0, 255), seed=seed))
    return keras.Sequential(layers, name="augmentation") if layers else None


def make_dataset(paths: list[str], labels: np.ndarray | None, spec: DatasetSpec, training: bool = False):
    """Decode once, cache uint8 at model resolution, then shuffle/augment per epoch.

    The cache sits before augmentation so every epoch sees fresh augmentations
    but no epoch after the first touches a JPEG decoder.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    size = spec.image_size
    if labels is None:
        labels = np.zeros(len(paths), dtype=np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((list(paths), labels.astype(np.float32)))
    dataset = dataset.map(lambda p, y: (decode_and_resize(tf.io.read_file(p), size), y), num_parallel_calls=autotune)
    dataset = dataset.cache()
    if training:
        dataset = dataset.shuffle(len(paths), seed=spec.seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(spec.batch_size, num_parallel_calls=autotune)
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune)
    augment = augmenter(spec.augmentation, spec.seed) if training else None
    if augment is not None:
        dataset = dataset.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=autotune)
    return dataset.prefetch(autotune)
