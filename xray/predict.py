"""Batch prediction through tf.data: the path evaluation and inference share."""

from __future__ import annotations

import numpy as np

from xray.data import DatasetSpec, make_dataset


def predict_paths(model, paths: list[str], spec: DatasetSpec) -> np.ndarray:
    """P(PNEUMONIA) for each image file, decoded and batched in parallel."""
    if not paths:
        return np.zeros(0, dtype=np.float32)
    return model.predict(make_dataset(paths, None, spec), verbose=0).reshape(-1)
