"""Label shift: a period whose images of each class look like val's, in another proportion (a pneumonia season).

Under label shift with a calibration that holds, every quantity of an image has val's distribution re-weighted by
q p / r + (1 - q)(1 - p) / (1 - r) (p: the image's calibrated probability, r: val's prevalence, q: the period's).
This module holds the maximum-likelihood q (:func:`prevalence_mle`), a probability moved to it (:func:`reweight`),
and the test that a period is val re-weighted (:func:`label_shift_test`), which the estimate's verdict runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP = 1e-6
CELLS = 2_000_000
"""Draws x images held in memory at once."""
ANSWERED_SCORE = 1.0
"""The out-of-distribution boundary of ``ood_score`` (xray.monitoring.ood): above it an image is not answered."""


def prevalence_mle(ratio_1: np.ndarray, ratio_0: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Maximum-likelihood prevalence of each row of ``weights`` (draws x images: how often each image is in a draw).

    ``ratio_1 = p / reference`` and ``ratio_0 = (1 - p) / (1 - reference)`` are each image's likelihood under either
    class up to a common factor; the log-likelihood sum w log(q ratio_1 + (1 - q) ratio_0) is concave in q, so its
    root on [0, 1] is found by bisection (50 halvings), all draws at once. The fixed point of Saerens' EM."""

    def slope(q: np.ndarray) -> np.ndarray:
        mixture = q[:, None] * ratio_1 + (1 - q[:, None]) * ratio_0
        return (weights * (ratio_1 - ratio_0) / mixture).sum(axis=1)

    draws = weights.shape[0]
    low, high = np.zeros(draws), np.ones(draws)
    for _ in range(50):
        middle = (low + high) / 2
        rising = slope(middle) > 0
        low, high = np.where(rising, middle, low), np.where(rising, high, middle)
    estimate = (low + high) / 2
    estimate = np.where(slope(np.zeros(draws)) <= 0, 0.0, estimate)
    return np.where(slope(np.ones(draws)) >= 0, 1.0, estimate)


def reweight(p: np.ndarray, reference: np.ndarray, prevalence) -> np.ndarray:
    """``p`` (calibrated at ``reference``) moved to ``prevalence`` by Bayes' rule; broadcasts over draws."""
    q = np.asarray(prevalence, dtype=np.float64)[..., None] if np.ndim(prevalence) else float(prevalence)
    positive, negative = q * p / reference, (1 - q) * (1 - p) / (1 - reference)
    return positive / (positive + negative)


@dataclass(frozen=True)
class LabelShiftTest:
    """:func:`label_shift_test`'s answer. A distance is NaN where that quantity was not tested."""

    distance: float
    """Kolmogorov-Smirnov distance of the probabilities from val's re-weighted."""
    p_value: float
    """Of the test as a whole (the smaller of the two quantities' p-values, calibrated by the same draws)."""
    prevalence: float
    """The period's maximum-likelihood prevalence, which val is re-weighted to."""
    score_distance: float = float("nan")
    """The same distance for ``ood_score``."""

    def describe(self) -> str:
        scores = "" if np.isnan(self.score_distance) else f", ood_score {self.score_distance:.2f}"
        return (
            f"Kolmogorov-Smirnov D = {self.distance:.2f} for the probabilities{scores}, against val's re-weighted to "
            f"{self.prevalence:.0%} PNEUMONIA, p = {self.p_value:.2g}"
        )


def _distance(sample: np.ndarray, atoms: np.ndarray, weights: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between ``sample``'s distribution and the weighted ``atoms``' (sorted)."""
    points = np.concatenate([atoms, sample])
    observed = np.searchsorted(np.sort(sample), points, side="right") / len(sample)
    expected = np.r_[0.0, np.cumsum(weights)][np.searchsorted(atoms, points, side="right")]
    return float(np.abs(observed - expected).max())


def _exceeding(null: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How many of ``null`` are at least each of ``values``."""
    return len(null) - np.searchsorted(np.sort(null), values - 1e-12, side="left")


def label_shift_test(
    p: np.ndarray, reference: np.ndarray, samples: int, seed: int = 0, scores=None, reference_scores=None
) -> LabelShiftTest:
    """Are the period's answers (at the version's operating point) distributed like val's re-weighted to some
    prevalence, as they are under label shift? ``p``: their probabilities, ``reference``: val's; ``scores`` and
    ``reference_scores`` (optional, each aligned with its probabilities): their ``ood_score``, tested jointly.

    The prevalence q is fitted by maximum likelihood on ``p``; each quantity's distance is between the period's
    distribution and val's re-weighted to q, over val's images that would have been answered (``ood_score`` at most
    1, when scores are given: the period's are answers too). The null distribution comes from ``samples`` draws that
    resample val (the reference is a sample too), draw a period of the same size from the re-weighted val, and refit
    q; with two quantities the statistic is the smaller of their p-values, compared with the same for each draw."""
    p = np.clip(np.asarray(p, dtype=np.float64), CLIP, 1 - CLIP)
    atoms = np.clip(np.asarray(reference, dtype=np.float64), CLIP, 1 - CLIP)
    prior, n = float(atoms.mean()), len(p)  # the prevalence the calibration was fitted at: every val image
    joint = scores is not None and reference_scores is not None and len(reference_scores) == len(atoms)
    if joint:
        scores = np.asarray(scores, dtype=np.float64)
        reference_scores = np.asarray(reference_scores, dtype=np.float64)
        joint = bool(np.isfinite(scores).all() and np.isfinite(reference_scores).all())
    kept = reference_scores <= ANSWERED_SCORE if joint else np.ones(len(atoms), bool)
    order = np.argsort(atoms[kept], kind="stable")
    atoms = atoms[kept][order]
    ratio_1, ratio_0 = atoms / prior, (1 - atoms) / (1 - prior)
    q = float(prevalence_mle(p / prior, (1 - p) / (1 - prior), np.ones((1, n)))[0])
    weight = q * ratio_1 + (1 - q) * ratio_0
    weight /= weight.sum()
    orders = [np.arange(len(atoms))]
    observed = [_distance(p, atoms, weight)]
    if joint:
        score_atoms = reference_scores[kept][order]
        orders.append(np.argsort(score_atoms, kind="stable"))
        observed.append(_distance(scores, score_atoms[orders[1]], weight[orders[1]]))
    rng, null, done = np.random.default_rng(seed), [], 0
    chunk = max(1, min(samples, CELLS // max(1, len(atoms))))
    while done < samples:
        size = min(chunk, samples - done)
        drawn = rng.multinomial(n, weight, size=size).astype(np.float64)
        val = rng.multinomial(len(atoms), np.full(len(atoms), 1 / len(atoms)), size=size)
        q_drawn = prevalence_mle(ratio_1, ratio_0, drawn)
        refit = val * (q_drawn[:, None] * ratio_1 + (1 - q_drawn[:, None]) * ratio_0)
        refit /= refit.sum(axis=1, keepdims=True)
        gaps = [np.abs(np.cumsum(drawn[:, o], axis=1) / n - np.cumsum(refit[:, o], axis=1)).max(axis=1) for o in orders]
        null.append(np.stack(gaps, axis=1))
        done += size
    null_gaps = np.concatenate(null)
    p_values = [(1 + _exceeding(null_gaps[:, k], np.array([d]))[0]) / (1 + samples) for k, d in enumerate(observed)]
    p_value = p_values[0]
    if joint:  # each draw's own smaller p-value, against the other draws: the combination keeps its level
        drawn_p = np.stack([_exceeding(null_gaps[:, k], null_gaps[:, k]) / samples for k in range(2)], axis=1)
        p_value = (1 + int((drawn_p.min(axis=1) <= min(p_values) + 1e-12).sum())) / (1 + samples)
    return LabelShiftTest(observed[0], float(p_value), q, observed[1] if joint else float("nan"))
