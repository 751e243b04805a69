"""Batch-level monitoring: does a batch of images still look like the data a model version was validated on?

Every test compares the batch with the version's :class:`xray.ood.ReferenceProfile`:

- **OOD share** (the drift decision): an exact one-sided binomial test of the number of images flagged
  out of distribution against the share of val images flagged at the same threshold. A batch drifts
  when significantly more of it is out of distribution than the reference shows.
- **Content embedding** (reported): a two-sample MMD test (Gaussian kernel, median-heuristic bandwidth,
  permutation p-value from ``scipy.stats.permutation_test``) between the batch and val in the content
  detector's component space.
- **Predicted-positive rate** (reported): a two-sided binomial test against the val rate at the
  version's threshold.
- **Acquisition statistics** (reported): a Kolmogorov-Smirnov test per statistic, Benjamini-Hochberg
  adjusted, and the batch's sizes, channels and colour against the train split's.

Why only the OOD share decides: the internal test split of the training archive itself differs from
val by the MMD test at p < 0.01 (docs/MONITORING.md), so a plain two-sample test would call every
batch from the same hospital's later acquisitions drift, and the prevalence of pneumonia changes
between batches without the model becoming untrustworthy.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image
from scipy.spatial.distance import cdist
from scipy.stats import binomtest, false_discovery_control, ks_2samp, permutation_test

from xray.errors import DataQualityError
from xray.monitoring import ood
from xray.monitoring.scope import OUT_OF_SCOPE

MMD_MAX_IMAGES = 1000
"""The MMD test uses at most this many batch images (a random subset), so its cost stays bounded."""


def ood_share_test(flagged: int, images: int, reference_fraction: float) -> float:
    """P-value of seeing at least ``flagged`` of ``images`` out of distribution when the true share is the reference's."""
    if images == 0:
        return 1.0
    return float(binomtest(flagged, images, reference_fraction, alternative="greater").pvalue)


def positive_rate_test(positives: int, images: int, reference_rate: float) -> float:
    if images == 0 or not 0 < reference_rate < 1:
        return 1.0
    return float(binomtest(positives, images, reference_rate, alternative="two-sided").pvalue)


def mmd_test(batch: np.ndarray, reference: np.ndarray, permutations: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(MMD^2, permutation p-value) between two samples of vectors, Gaussian kernel with median-heuristic bandwidth.

    The kernel matrix is computed once; each permutation re-assigns images to the two samples, which
    ``scipy.stats.permutation_test`` does by permuting their indices.
    """
    batch, reference = np.asarray(batch, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if len(batch) < 2 or len(reference) < 2:
        return float("nan"), 1.0
    pooled = np.concatenate([batch, reference])
    squared = cdist(pooled, pooled, "sqeuclidean")
    reference_pairs = squared[len(batch) :, len(batch) :]
    bandwidth = float(np.median(reference_pairs[np.triu_indices(len(reference), 1)])) or 1.0
    kernel = np.exp(-squared / bandwidth)
    sizes = len(batch), len(reference)

    def statistic(first, second, axis=-1):
        single = np.ndim(first) == 1
        first, second = np.atleast_2d(first).astype(int), np.atleast_2d(second).astype(int)
        weights = np.zeros((first.shape[0], len(pooled)))
        rows = np.arange(first.shape[0])[:, None]
        weights[rows, first] = 1.0 / sizes[0]
        weights[rows, second] = -1.0 / sizes[1]
        values = np.einsum("bi,ij,bj->b", weights, kernel, weights)
        return values[0] if single else values

    result = permutation_test(
        (np.arange(sizes[0]), np.arange(sizes[0], len(pooled))),
        statistic,
        permutation_type="independent",
        vectorized=True,
        n_resamples=permutations,
        alternative="greater",
        batch=100,
        rng=np.random.default_rng(seed),
    )
    return float(result.statistic), float(result.pvalue)


def acquisition_tests(batch_stats: np.ndarray, reference_stats: np.ndarray) -> list[dict]:
    """Per statistic: batch and reference medians, KS statistic, BH-adjusted p-value; largest shifts first."""
    if len(batch_stats) == 0:
        return []
    raw = [ks_2samp(batch_stats[:, i], reference_stats[:, i]) for i in range(len(ood.STAT_NAMES))]
    adjusted = false_discovery_control([r.pvalue for r in raw], method="bh")
    rows = [
        {
            "statistic": name,
            "label": ood.stat_label(name),
            "batch_median": float(np.median(batch_stats[:, i])),
            "reference_median": float(np.median(reference_stats[:, i])),
            "ks": float(r.statistic),
            "p_adjusted": float(p),
        }
        for i, (name, r, p) in enumerate(zip(ood.STAT_NAMES, raw, adjusted))
    ]
    return sorted(rows, key=lambda row: -row["ks"])


def compare(
    profile: ood.ReferenceProfile,
    predictions: pd.DataFrame,
    features: pd.DataFrame,
    alpha: float = 0.01,
    permutations: int = 1000,
    seed: int = 0,
) -> dict:
    """The monitoring report of one batch.

    ``predictions``: one row per image with ``status`` (ok, out_of_scope, out_of_distribution or unreadable),
    ``reason``, ``probability`` and ``ood_score``; ``features``: :func:`xray.ood.feature_table` of the
    readable images, in the same order.
    """
    status = predictions["status"].astype(str)
    readable = status != ood.UNREADABLE
    images, n_readable = len(predictions), int(readable.sum())
    if n_readable == 0:
        examples = "; ".join(f"{p}: {r}" for p, r in zip(predictions.get("path", []), predictions["reason"]))
        raise DataQualityError(
            f"none of the {images} images could be read, nothing to monitor"
            + (f" (e.g. {examples[:300]})" if examples else "")
        )
    if n_readable != len(features):
        raise ValueError(f"{len(features)} feature rows for {n_readable} readable images")
    # An image out of scope whose pixels were flagged too (its reason says both) counts as out of distribution.
    out_of_scope = status == OUT_OF_SCOPE
    pixels_flagged = (status == ood.OUT_OF_DISTRIBUTION) | (
        out_of_scope & predictions["reason"].astype(str).str.contains("out of distribution: ", regex=False)
    )
    flagged = int(pixels_flagged.sum())
    reference_fraction = max(profile.val_ood_fraction, profile.alpha)
    p_ood = ood_share_test(flagged, n_readable, reference_fraction)
    stats = features[list(ood.STAT_NAMES)].to_numpy(dtype=np.float64)
    content = features[ood.content_columns(profile)].to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    subset = rng.choice(len(content), MMD_MAX_IMAGES, replace=False) if len(content) > MMD_MAX_IMAGES else slice(None)
    mmd, p_mmd = mmd_test(content[subset], profile.val_content, permutations, seed)
    probabilities = predictions.loc[readable, "probability"].to_numpy(dtype=np.float64)
    positives = int((probabilities >= profile.class_threshold).sum())
    p_positive = positive_rate_test(positives, n_readable, profile.val_positive_rate)
    reasons = predictions.loc[status == ood.OUT_OF_DISTRIBUTION, "reason"].astype(str)
    scope_reasons = predictions.loc[out_of_scope, "reason"].astype(str).str.split(" ").str[0]
    return {
        "drift_detected": bool(p_ood < alpha),
        "p_value": p_ood,
        "alpha": alpha,
        "images": images,
        "readable": n_readable,
        "unreadable": images - n_readable,
        "ood_images": flagged,
        "out_of_scope_images": int(out_of_scope.sum()),
        "out_of_scope_tags": scope_reasons.value_counts().to_dict(),
        "ood_fraction": flagged / n_readable if n_readable else 0.0,
        "reference_ood_fraction": reference_fraction,
        "decision": (
            f"{flagged} of {n_readable} readable images out of distribution "
            f"({flagged / max(n_readable, 1):.1%}) against {reference_fraction:.1%} on val: "
            f"binomial p = {p_ood:.3g} {'<' if p_ood < alpha else '>='} {alpha:g}"
        ),
        "ood_reasons": reasons.map(reason_kind).value_counts().to_dict(),
        "embedding": {
            "test": "MMD, Gaussian kernel, permutation p-value",
            "mmd2": mmd,
            "p_value": p_mmd,
            "images_used": int(len(content[subset])),
            "reference_images": int(len(profile.val_content)),
            "shifted": bool(p_mmd < alpha),
        },
        "positive_rate": {
            "batch": positives / n_readable if n_readable else float("nan"),
            "reference": profile.val_positive_rate,
            "p_value": p_positive,
            "class_threshold": profile.class_threshold,
            "shifted": bool(p_positive < alpha),
        },
        "acquisition": {
            "tests": acquisition_tests(stats, profile.val_stats),
            "batch": acquisition_summary(features),
            "train": profile.summary,
        },
    }


def reason_kind(reason: str) -> str:
    """The family of an out-of-distribution reason: colour, size, aspect ratio, content or acquisition."""
    for kind in ("colour", "size", "aspect ratio", "content", "acquisition"):
        if kind in reason:
            return kind
    return "other"


def acquisition_summary(features: pd.DataFrame) -> dict:
    aspect = features["width"] / features["height"]
    return {
        "width": _range(features["width"]),
        "height": _range(features["height"]),
        "aspect_ratio": _range(aspect),
        "channels": {str(c): int(n) for c, n in features["channels"].value_counts().sort_index().items()},
        "colour_max": float(features["colour"].max()),
    }


def _range(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}


# ---------------------------------------------------------------------------------------------------------------
# Synthetic shifts of real radiographs: the inputs a site's pipeline can produce by mistake. Each takes and returns
# a uint8 RGB array (H, W, 3). They are how the out-of-distribution detector and this drift test are measured
# (benchmarks/ood_detectors.py, docs/MONITORING.md); they never fit or tune the detector.

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


def apply_shift(name: str, image: np.ndarray, seed: int) -> np.ndarray:
    if name not in SHIFTS:
        raise KeyError(f"unknown shift {name!r}; known: {sorted(SHIFTS)}")
    return SHIFTS[name](np.asarray(image, dtype=np.uint8), np.random.default_rng(seed))
