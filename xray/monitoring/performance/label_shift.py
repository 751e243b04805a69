"""Label shift: a period whose images of each class look like val's, in another proportion (a pneumonia season).

Under label shift each class's images look as they did on val, so every quantity of an image has val's distribution
re-weighted by its label, q y / y' + (1 - q)(1 - y) / (1 - y') (y: the image's label, y': val's share of PNEUMONIA,
q: the period's); with a calibration that holds, the probability alone also has val's re-weighted by
q p / r + (1 - q)(1 - p) / (1 - r) (p: the calibrated probability, r: the prevalence it is calibrated at), which
needs no label, but a quantity that tells the classes apart beyond p (``ood_score``) does not.
This module holds the maximum-likelihood q (:func:`prevalence_mle`), a probability moved to it (:func:`reweight`),
and the test that a period is val re-weighted (:func:`label_shift_test`), which the estimate's verdict runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xray.monitoring.ood import SCORE_COLUMNS

CLIP = 1e-6
CELLS = 2_000_000
"""Draws x images held in memory at once."""
ANSWERED_SCORE = 1.0
"""The out-of-distribution boundary of ``ood_score`` (xray.monitoring.ood): above it an image is not answered."""
MIN_REFERENCE = 20
"""Val images answered, at least, for ``ood_score`` to be tested."""


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


SCORES = ("ood_score",)
"""The scores the estimate's verdict tests beside the probability (xray.monitoring.performance.estimation)."""
DETECTOR = SCORE_COLUMNS
"""Every label-free score an answer carries (the prediction log keeps each). Testing all of them was tried and not
adopted (docs/BENCHMARKS.md, issue #44 run 5: the smallest of four p-values cost more power on the benchmark's
miscalibrated weeks than the two detector scores added); ``benchmarks/label_shift_level.py`` measures it."""


@dataclass(frozen=True)
class LabelShiftTest:
    """:func:`label_shift_test`'s answer."""

    distance: float
    """Kolmogorov-Smirnov distance of the probabilities from val's re-weighted."""
    p_value: float
    """Of the test as a whole (the smallest of the quantities' p-values, calibrated by the same draws)."""
    prevalence: float
    """The period's maximum-likelihood prevalence, which val is re-weighted to."""
    distances: dict = field(default_factory=dict)
    """The same distance for each score tested (``ood_score``, ``content_z``, ``acquisition_z``), by name."""
    untested: str = ""
    """Why a score asked for was not tested."""

    @property
    def score_distance(self) -> float:
        """The distance of ``ood_score`` (NaN where it was not tested)."""
        return self.distances.get("ood_score", float("nan"))

    def describe(self) -> str:
        """The distances, the prevalence and the p-value, in one clause (why a score was untested apart)."""
        scores = "".join(f", {name} {value:.2f}" for name, value in self.distances.items())
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


def _scores_untested(p, scores, reference, reference_scores, labels, names) -> str:
    """Why no score can be tested with these inputs ("" when they can); ``names``: the scores'."""
    why = f"{_listed(names)} not tested: "
    if len(reference_scores) != len(reference):
        return why + "the reference profile's scores are not aligned with its probabilities"
    if labels is None or not len(labels):
        return why + "the reference profile keeps no val labels"
    if len(labels) != len(reference):
        return why + "the reference profile's val labels are not aligned with its probabilities"
    if not np.isin(labels, (0, 1)).all():
        return why + "the reference profile's val labels are not 0 and 1"
    if len(np.unique(labels)) < 2:
        return why + "the reference profile's val labels are of one class"
    if len(scores) != len(p):
        return why + "the scores are not aligned with the probabilities"
    if (reference_scores[:, 0] <= ANSWERED_SCORE).sum() < MIN_REFERENCE:
        return why + f"fewer than {MIN_REFERENCE} val images answered"
    return ""


def _missing(scores, reference_scores, names) -> tuple[np.ndarray, str]:
    """Which scores every answer and val image has (a log written before a score was kept has none), and why the
    others are not tested."""
    reasons: dict[tuple[int, str], list[str]] = {}
    for k, name in enumerate(names):
        for missing, what in (
            ((~np.isfinite(scores[:, k])).sum(), "answers"),
            ((~np.isfinite(reference_scores[:, k])).sum(), "val images"),
        ):
            if missing:
                reasons.setdefault((int(missing), what), []).append(name)
                break
    kept = np.array([not any(name in group for group in reasons.values()) for name in names], dtype=bool)
    return kept, "; ".join(
        f"{_listed(group)} not tested: {missing} {what} without {'one' if len(group) == 1 else 'them'}"
        for (missing, what), group in reasons.items()
    )


def _columns(values, count: int) -> np.ndarray:
    """Scores as (images, scores): one score's may come as a vector, and none as an empty one."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values.reshape(0, count)
    return values[:, None] if values.ndim == 1 else values


def _listed(names) -> str:
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]


def label_shift_test(
    p,
    reference,
    samples: int,
    seed: int = 0,
    scores=None,
    reference_scores=None,
    reference_labels=None,
    names: tuple[str, ...] = SCORES,
) -> LabelShiftTest:
    """Are the period's answers (at the version's operating point) distributed like val's re-weighted to some
    prevalence, as they are under label shift? ``p``: their probabilities, ``reference``: val's. With ``scores``,
    ``reference_scores`` (one column per name of ``names``, ``ood_score`` first) and ``reference_labels`` (val's,
    aligned with ``reference``): each score too.

    The prevalence q is fitted by maximum likelihood on ``p``. Val is re-weighted to it by each image's label
    (q y / y' + (1 - q)(1 - y) / (1 - y'), y' val's share: exact under label shift for any quantity of an image), or,
    without labels, by its probability (q p / r + (1 - q)(1 - p) / (1 - r): exact for the probability alone), and
    where val's scores are given (aligned) only over its images that would have been answered (``ood_score`` at most
    1: the period's are answers too). Answers and val images without a finite probability are left out; a score that
    an answer or a val image lacks is not tested, and ``untested`` says so. Each quantity's distance is
    Kolmogorov-Smirnov; its null distribution comes from ``samples`` draws that resample val (the reference is a
    sample too), draw a period of the same size from the re-weighted val, and refit q; with several quantities the
    statistic is the smallest of their p-values, compared with each draw's own."""
    p, atoms = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (p, reference))
    asked = scores is not None and reference_scores is not None
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ValueError("no names for the scores")
    if asked:
        scores, reference_scores = (_columns(a, len(names)) for a in (scores, reference_scores))
        if scores.shape[1] != len(names) or reference_scores.shape[1] != len(names):
            raise ValueError(f"scores of {scores.shape[1]} and {reference_scores.shape[1]} columns for names {names}")
    labels = None if reference_labels is None else np.asarray(reference_labels, dtype=np.float64).reshape(-1)
    untested = _scores_untested(p, scores, atoms, reference_scores, labels, names) if asked else ""
    tested = np.zeros(len(names), dtype=bool)
    if asked and not untested:
        tested, untested = _missing(scores, reference_scores, names)
    joint = bool(tested.any())
    finite = np.isfinite(p)  # an answer or a val image without a probability is left out, with its score and label
    p, scores = p[finite], (scores[finite][:, tested] if joint else None)
    kept = np.isfinite(atoms)
    if asked and len(reference_scores) == len(atoms):
        answerable = kept & (reference_scores[:, 0] <= ANSWERED_SCORE)  # val's images that would have been answered
        kept = answerable if answerable.sum() >= MIN_REFERENCE else kept  # as the period's answers are
    n = len(p)
    if not n or not kept.any():
        return LabelShiftTest(float("nan"), 1.0, float("nan"), untested=untested)
    p = np.clip(p, CLIP, 1 - CLIP)
    order = np.argsort(atoms[kept], kind="stable")
    atoms = np.clip(atoms[kept][order], CLIP, 1 - CLIP)
    prior = float(atoms.mean())  # the prevalence the calibration answers at, over the images that are answered
    ratio_1, ratio_0 = atoms / prior, (1 - atoms) / (1 - prior)
    q = float(prevalence_mle(p / prior, (1 - p) / (1 - prior), np.ones((1, n)))[0])
    y = labels[kept][order] if joint else None

    def weights(q_, counts):  # val (counts of each image) re-weighted to q_: by label where known
        if y is not None:
            share = np.clip(
                (counts * y).sum(axis=-1, keepdims=True) / counts.sum(axis=-1, keepdims=True), CLIP, 1 - CLIP
            )
            unnormalised = counts * (q_ * y / share + (1 - q_) * (1 - y) / (1 - share))
        else:
            unnormalised = counts * (q_ * ratio_1 + (1 - q_) * ratio_0)
        return unnormalised / unnormalised.sum(axis=-1, keepdims=True)

    weight = weights(q, np.ones(len(atoms)))
    values, samples_of = [atoms], [p]
    if joint:
        values += list(reference_scores[kept][order][:, tested].T)
        samples_of += list(scores.T)
    orders = [np.argsort(v, kind="stable") for v in values]
    ends = [np.r_[np.flatnonzero(np.diff(v[o]) > 0), len(o) - 1] for v, o in zip(values, orders)]
    observed = [_distance(sample, v[o], weight[o]) for sample, v, o in zip(samples_of, values, orders)]
    rng, null, done = np.random.default_rng(seed), [], 0
    chunk = max(1, min(samples, CELLS // len(atoms)))
    while done < samples:
        size = min(chunk, samples - done)
        drawn = rng.multinomial(n, weight, size=size).astype(np.float64)
        val = rng.multinomial(len(atoms), np.full(len(atoms), 1 / len(atoms)), size=size).astype(np.float64)
        refit = weights(prevalence_mle(ratio_1, ratio_0, drawn)[:, None], val)
        gaps = [
            np.abs(np.cumsum(drawn[:, o], axis=1)[:, e] / n - np.cumsum(refit[:, o], axis=1)[:, e]).max(axis=1)
            for o, e in zip(orders, ends)
        ]
        null.append(np.stack(gaps, axis=1))
        done += size
    null_gaps = np.concatenate(null)
    p_values = [(1 + _exceeding(null_gaps[:, k], np.array([d]))[0]) / (1 + samples) for k, d in enumerate(observed)]
    p_value = p_values[0]
    if joint:  # each draw's own smallest p-value, the observed among the draws: the combination keeps its level
        drawn_p = np.stack(
            [
                (_exceeding(null_gaps[:, k], null_gaps[:, k]) + (observed[k] >= null_gaps[:, k] - 1e-12))
                / (1 + samples)
                for k in range(len(observed))
            ],
            axis=1,
        )
        p_value = (1 + int((drawn_p.min(axis=1) <= min(p_values) + 1e-12).sum())) / (1 + samples)
    distances = dict(zip([name for name, t in zip(names, tested) if t], observed[1:]))
    return LabelShiftTest(observed[0], float(p_value), q, distances, untested)
