"""Synthetic shifts of real radiographs: the inputs a site's pipeline can produce by mistake.

Each takes and returns a uint8 RGB array (H, W, 3). They are how the out-of-distribution
detector and the drift test are measured (benchmarks/ood_detectors.py, docs/MONITORING.md);
they are never used to fit or tune the detector.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Negative: bone dark, air bright (a MONOCHROME1 image read as MONOCHROME2)."""
    return 255 - image


def rotate90(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A quarter turn, one way or the other (an orientation tag ignored)."""
    return np.ascontiguousarray(np.rot90(image, k=int(rng.choice([1, 3]))))


def corner_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One corner quarter (half the height and half the width), enlarged back to the full size."""
    height, width = image.shape[:2]
    top, left = int(rng.integers(2)) * (height // 2), int(rng.integers(2)) * (width // 2)
    crop = Image.fromarray(image[top : top + height // 2, left : left + width // 2])
    return np.asarray(crop.resize((width, height), Image.Resampling.BILINEAR))


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, sigma: float = 0.2 * 255) -> np.ndarray:
    """Additive Gaussian noise, sigma 20% of the range, the same on every channel (a grey image stays grey)."""
    noise = rng.normal(0.0, sigma, image.shape[:2])[..., None]
    return np.clip(image.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def gamma(image: np.ndarray, rng: np.random.Generator, exponents: tuple[float, float] = (1 / 3, 3.0)) -> np.ndarray:
    """Extreme gamma: exponent 1/3 (washed out) or 3 (crushed), one of the two at random."""
    exponent = float(rng.choice(exponents))
    return np.round(255.0 * (image / 255.0) ** exponent).astype(np.uint8)


SHIFTS: dict[str, Shift] = {
    "invert": invert,
    "rotate90": rotate90,
    "corner_crop": corner_crop,
    "gaussian_noise": gaussian_noise,
    "gamma": gamma,
}


def apply(name: str, image: np.ndarray, seed: int) -> np.ndarray:
    if name not in SHIFTS:
        raise KeyError(f"unknown shift {name!r}; known: {sorted(SHIFTS)}")
    return SHIFTS[name](np.asarray(image, dtype=np.uint8), np.random.default_rng(seed))
