"""Performance before the labels: sensitivity, specificity, PPV, NPV and AUC estimated from the logged calibrated
probabilities, per period, site and version (and DICOM subgroup), with 95% bands and a verdict on trusting them.

**The estimate** (confidence-based performance estimation, CBPE). A calibrated probability is an expected label. At
each answered row's own operating point (PNEUMONIA when ``probability >= threshold``), the expected confusion matrix
is TP = the sum of p over the rows called PNEUMONIA, FN = the sum of p over the others, FP and TN the same with
1 - p; sensitivity = TP / (TP + FN), specificity, PPV and NPV likewise. The expected AUC is the probability-weighted
Mann-Whitney statistic: each pair of images counts with the probability that the first is PNEUMONIA and the second
is not. Only rows with status ``ok`` count, as in :mod:`feedback`: they are the answers a reader saw.

**Prevalence.** A probability calibrated on val is calibrated at val's prevalence (74% PNEUMONIA for the default
recipe). A period whose images of each class look like the reference's but in another proportion (label shift:
a pneumonia season) needs its probabilities moved to its own prevalence. That prevalence is the maximum-likelihood
prior of Saerens, Latinne and Decaestecker (2002) given the probabilities, and each probability is re-weighted to it
by Bayes' rule: p' = w1 p / (w1 p + w0 (1 - p)), w1 = prevalence / reference, w0 = (1 - prevalence) / (1 - reference).
The reference is the prevalence the operating point's calibration was fitted on (:class:`Reference`). Under label
shift p' is calibrated for the period. Plain CBPE (``Settings.adjust_prevalence=False``, NannyML's) assumes
P(label | image) unchanged instead, which a change of prevalence breaks.

**Bands.** 95% percentile intervals over ``samples`` draws. Each draw resamples the period's images (bootstrap:
which images the period happened to get), draws the calibration's parameters where the operating point records how
well its fit knows them (``calibration_covariance``: a site's calibration fitted on a few hundred images is itself a
sample), re-estimates the prevalence on them, and draws each image's label from its probability (Poisson-binomial:
which of them are PNEUMONIA). The band is where the realised value should fall.

**The verdict** (:func:`judge`). An estimate is ``reliable`` unless one of these holds, each said in ``reasons``:

- too few images: fewer than ``min_per_class`` expected PNEUMONIA or NORMAL among the answered rows;
- out of distribution: the share of readable images flagged is above the reference's (val's flagged share, at least
  ``monitoring.ood_alpha``), by the drift test's one-sided exact binomial test at ``alpha``. The detector catches
  most of an unlike population, not all (87% of adult X-rays): the rest are answered, at a calibration that does not
  hold for them;
- out of scope: the share out of scope is above the reference's (none: a version is validated on images in scope),
  by the same test against the floor ``ood_alpha``;
- drift: the period's ``ood_score`` distribution differs from val's (two-sample Kolmogorov-Smirnov at ``alpha``): a
  shift that moves every image a little (a new exposure curve, another scanner) flags few images one by one;
- calibration: the answers (at the version's operating point) are unlike val's re-weighted to any prevalence
  (:mod:`label_shift`): their probabilities, or their ``ood_score`` (val re-weighted by its labels is the label-shifted
  population for any quantity of an image, so a population that the model and the detector see as val's classes in
  another mix passes both; a reference profile without val's labels tests the probabilities alone). If
  not, the images of a class no longer look as val's did, so the calibration, and with it the estimate, need not
  hold. Tested on the period, then pooled with the ``window - 1`` periods before it of the same site and version:
  under label shift any mix of periods is val re-weighted too, so pooling keeps the test valid and multiplies its
  power (the drift test above is neither re-weighted nor pooled: a change of prevalence moves ``ood_score`` where
  the classes score differently);
- a site without its own calibration: a row of a named site at another operating point than the site's own;
- no reference: the version's reference profile (or the operating point's prevalence) is unknown.

An unreliable estimate is shown, never alerted on (:func:`degradations`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

from xray.data.manifest import SUBGROUPS
from xray.evaluation.calibration import logit, sigmoid
from xray.monitoring.drift import ood_share_test
from xray.monitoring.ood import OUT_OF_DISTRIBUTION, UNREADABLE, ReferenceProfile
from xray.monitoring.performance.feedback import GROUP, period_of
from xray.monitoring.performance.label_shift import CELLS, CLIP, label_shift_test, prevalence_mle, reweight
from xray.monitoring.scope import OUT_OF_SCOPE

logger = logging.getLogger(__name__)

ESTIMATED = ("sensitivity", "specificity", "ppv", "npv", "auc", "prevalence")
COMPARED = ("sensitivity", "specificity", "auc")
"""The metrics both the estimate and feedback have: compared side by side, one plot each."""
RELIABLE, UNRELIABLE = "reliable", "unreliable"
VERSION_POINT = "version"


@dataclass(frozen=True)
class Reference:
    """What a version's estimates are judged against: its reference profile and operating points."""

    prevalence: dict[str, float]
    """Per operating point (``version``, ``site:<name>``): the share of PNEUMONIA its calibration was fitted on."""
    ood_fraction: float
    """The out-of-distribution share the drift test expects: val's flagged share, at least ``ood_alpha``."""
    alpha: float
    """``monitoring.ood_alpha``: the floor of an expected share (out of scope's reference share is none)."""
    scores: np.ndarray = field(repr=False)
    """Val's ``ood_score`` (aligned with ``probabilities``): the reference of the drift and label-shift tests."""
    probabilities: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    """Val's calibrated probabilities: the reference of the label-shift test (:mod:`label_shift`)."""
    calibrations: dict[str, tuple[dict, np.ndarray]] = field(repr=False, default_factory=dict)
    """Per site operating point that records it: its calibration and the covariance of its parameters."""
    labels: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    """Val's labels, aligned with ``probabilities``: the label-shift test re-weights val by them (none: by
    probability)."""

    @classmethod
    def of(cls, profile: ReferenceProfile, operating_points: dict[str, dict] | None = None) -> Reference:
        """From the version's profile (val's calibrated probabilities: a Platt fit by maximum likelihood has their
        mean equal to val's prevalence) and its sites' operating points (the counts each was fitted on)."""
        prevalence, calibrations = {VERSION_POINT: float(np.mean(profile.val_probabilities))}, {}
        for site, point in (operating_points or {}).items():
            share = point_prevalence(point)
            if share is not None:
                prevalence[f"site:{site}"] = share
            if point.get("calibration_covariance") and point["calibration"]["method"] in ("platt", "temperature"):
                calibrations[f"site:{site}"] = (point["calibration"], np.asarray(point["calibration_covariance"]))
        expected = max(profile.val_ood_fraction, profile.alpha)
        probabilities = np.asarray(profile.val_probabilities)
        labels = np.asarray(getattr(profile, "val_labels", np.zeros(0)))
        return cls(prevalence, expected, profile.alpha, profile.val_scores, probabilities, calibrations, labels)


def point_prevalence(point: dict) -> float | None:
    """The share of PNEUMONIA a site's operating point was fitted on: its ``prevalence``, else the counts of its
    ``fitted_on`` (xray.evaluation.recipes.site_operating_point: ``val of this site at training ({...})``)."""
    if point.get("prevalence") is not None:
        return float(point["prevalence"])
    found = re.search(r"'NORMAL': (\d+), 'PNEUMONIA': (\d+)", str(point.get("fitted_on", "")))
    if not found or not int(found[1]) + int(found[2]):
        return None
    return int(found[2]) / (int(found[1]) + int(found[2]))


@dataclass(frozen=True)
class Settings:
    samples: int = 1000
    """Draws of the bands (``evaluate.bootstrap_samples``)."""
    alpha: float = 0.01
    """Significance of the verdict's tests (``monitoring.drift_alpha``)."""
    min_per_class: int = 20
    """Expected images of each class a reliable estimate needs (``monitoring.feedback_min_per_class``)."""
    adjust_prevalence: bool = True
    seed: int = 0
    window: int = 4
    """Periods (this one and those before it, same site and version) the calibration test pools."""


# -- the estimate of one set of answered rows ------------------------------------------------------------------------


def _auc(positives: np.ndarray, negatives: np.ndarray, ties: tuple[np.ndarray, np.ndarray], self_pairs=0.0):
    """Mann-Whitney AUC of weighted positives and negatives (draws x images), ties half; ``ties``: the order of the
    scores and where each run of equal scores starts. ``self_pairs``: sum of p(1 - p), an image paired with itself,
    taken out of an expectation."""
    order, starts = ties
    pos = np.add.reduceat(positives[:, order], starts, axis=1)
    neg = np.add.reduceat(negatives[:, order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1) - self_pairs
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((pos * (below + 0.5 * neg)).sum(axis=1) - 0.5 * self_pairs) / pairs


def _ratios(tp, fp, tn, fn) -> dict:
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "prevalence": (tp + fn) / (tp + fp + tn + fn),
        }


def _perturbed(p: np.ndarray, calibrations, size: int, rng) -> np.ndarray:
    """``size`` draws of ``p``, each operating point's calibration parameters drawn from the fit's asymptotic normal
    (``calibrations``: (rows, their uncalibrated logit, the fitted (slope, bias) or (slope,), their covariance))."""
    drawn = np.repeat(p[None], size, axis=0)
    for rows, z, mean, covariance in calibrations:
        theta = rng.multivariate_normal(mean, covariance, size)
        bias = theta[:, 1:2] if len(mean) == 2 else 0.0  # a temperature has no bias
        drawn[:, rows] = sigmoid(np.maximum(theta[:, :1], 1e-3) * z + bias)
    return np.clip(drawn, CLIP, 1 - CLIP)


def estimate_rows(p, called, reference, settings: Settings = Settings(), calibrations=()) -> dict:
    """The estimate of one set of answered rows: expected counts, the metrics and their 95% bands, the prevalence.

    ``p``: calibrated probabilities; ``called``: PNEUMONIA at the row's threshold; ``reference``: per row, the
    prevalence its calibration was fitted on (used when ``settings.adjust_prevalence``); ``calibrations``: the rows
    whose calibration's parameters the bands draw (:func:`_perturbed`)."""
    p = np.clip(np.asarray(p, dtype=np.float64), CLIP, 1 - CLIP)
    called = np.asarray(called, dtype=bool)
    reference = np.clip(np.broadcast_to(np.asarray(reference, dtype=np.float64), p.shape), CLIP, 1 - CLIP)
    n = len(p)
    result = {"answered": n, "estimated_prevalence_raw": float(p.mean()) if n else float("nan")}
    names = [f"estimated_{m}{s}" for m in ESTIMATED for s in ("", "_low", "_high")]
    result |= dict.fromkeys(names + ["expected_tp", "expected_fp", "expected_tn", "expected_fn"], float("nan"))
    if n == 0:
        return result
    ratio_1, ratio_0 = p / reference, (1 - p) / (1 - reference)
    adjust = settings.adjust_prevalence
    prevalence = prevalence_mle(ratio_1, ratio_0, np.ones((1, n)))[0] if adjust else None
    expected = reweight(p, reference, prevalence) if adjust else p
    tp, fn = expected[called].sum(), expected[~called].sum()
    fp, tn = (1 - expected[called]).sum(), (1 - expected[~called]).sum()
    result |= {"expected_tp": float(tp), "expected_fp": float(fp), "expected_tn": float(tn), "expected_fn": float(fn)}
    order = np.argsort(p, kind="stable")
    ties = (order, np.flatnonzero(np.r_[True, np.diff(p[order]) > 0]))
    point = _ratios(tp, fp, tn, fn)
    point["auc"] = _auc(expected[None], 1 - expected[None], ties, float((expected * (1 - expected)).sum()))[0]
    draws = {m: [] for m in ESTIMATED}
    rng = np.random.default_rng(settings.seed)
    chunk = max(1, min(settings.samples, CELLS // n))
    for start in range(0, settings.samples, chunk):
        weights = rng.multinomial(n, np.full(n, 1 / n), size=min(chunk, settings.samples - start)).astype(np.float64)
        drawn = _perturbed(p, calibrations, len(weights), rng) if calibrations else p[None]
        ratios = (drawn / reference, (1 - drawn) / (1 - reference)) if calibrations else (ratio_1, ratio_0)
        drawn = reweight(drawn, reference, prevalence_mle(*ratios, weights)) if adjust else drawn
        positives = rng.binomial(weights.astype(np.int64), np.broadcast_to(drawn, weights.shape)).astype(np.float64)
        negatives = weights - positives
        counts = [(positives * called).sum(1), (negatives * called).sum(1)]
        counts += [(negatives * ~called).sum(1), (positives * ~called).sum(1)]
        for name, values in (_ratios(*counts) | {"auc": _auc(positives, negatives, ties)}).items():
            draws[name].append(values)
    for name in ESTIMATED:
        values = np.concatenate(draws[name])
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [2.5, 97.5]) if len(values) else (np.nan, np.nan)
        result |= {
            f"estimated_{name}": float(point[name]),
            f"estimated_{name}_low": float(low),
            f"estimated_{name}_high": float(high),
        }
    return result


# -- the verdict ---------------------------------------------------------------------------------------------------


def judge(rows: pd.DataFrame, estimate: dict, reference: Reference | None, settings: Settings, earlier=()) -> list[str]:
    """Why the estimate of ``rows`` (one group of the log, every status) is unreliable; empty when it is reliable.
    ``earlier``: the answers at the version's operating point of the periods before (pooled by the calibration test)."""
    reasons = []
    status = rows["status"].astype(str)
    if reference is None:
        return ["no reference profile for this version: nothing to judge the period against"]
    expected_positive = estimate["expected_tp"] + estimate["expected_fn"]
    expected_negative = estimate["expected_fp"] + estimate["expected_tn"]
    if not min(expected_positive, expected_negative) >= settings.min_per_class:  # NaN (nothing answered) too
        reasons.append(
            f"too few images: {estimate['answered']} answered, about {np.nan_to_num(expected_positive):.1f} PNEUMONIA "
            f"and {np.nan_to_num(expected_negative):.1f} NORMAL expected (at least {settings.min_per_class} of each)"
        )
    readable = status != UNREADABLE
    flagged = int((status == OUT_OF_DISTRIBUTION).sum() + _scope_and_pixels(rows).sum())
    tests = (
        ("out of distribution", flagged, int(readable.sum()), reference.ood_fraction, "readable images"),
        ("out of scope", int((status == OUT_OF_SCOPE).sum()), len(rows), reference.alpha, "images"),
    )
    for name, count, total, expected, of in tests:
        p_value = ood_share_test(count, total, expected)
        if p_value < settings.alpha:
            reasons.append(
                f"{name}: {count} of {total} {of} ({count / total:.1%}) against {expected:.1%} expected from the "
                f"reference (binomial p = {p_value:.2g} < {settings.alpha:g})"
            )
    scores = rows.loc[readable, "ood_score"].to_numpy(dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if len(scores) >= 2 and len(reference.scores) >= 2:
        test = ks_2samp(scores, reference.scores)
        if test.pvalue < settings.alpha:
            reasons.append(
                f"drift: ood_score unlike val's (median {np.median(scores):.2f} against "
                f"{np.median(reference.scores):.2f}; Kolmogorov-Smirnov D = {test.statistic:.2f}, p = "
                f"{test.pvalue:.2g} < {settings.alpha:g})"
            )
    answered = rows[status == "ok"]
    at_version = _answers(answered)
    pools = [("the", at_version)]
    if len(earlier):
        pools.append((f"this period's and the {len(earlier)} earlier", np.concatenate([earlier, at_version])))
    draws = max(settings.samples, int(np.ceil(4 / settings.alpha)))  # its p-value is at least ~3 / (draws + 1)
    for what, pool in pools if len(reference.probabilities) >= settings.min_per_class else ():
        if len(at_version) < settings.min_per_class:
            break
        test = label_shift_test(
            pool[:, 0],
            reference.probabilities,
            draws,
            settings.seed,
            pool[:, 1],
            reference.scores,
            reference.labels,
        )
        if test.p_value < settings.alpha:
            reasons.append(
                f"calibration: {what} answers are unlike val's at any prevalence ({test.describe()} < "
                f"{settings.alpha:g}): not a change of prevalence alone"
                + (f" ({test.untested})" if test.untested else "")
            )
            break
    own = np.where(answered["site"] == "", VERSION_POINT, "site:" + answered["site"].astype(str))
    foreign = answered[answered["operating_point"].to_numpy() != own]
    if len(foreign):
        first = foreign.iloc[0]
        reasons.append(
            f"site without its own calibration: {len(foreign)} answers of site {first['site'] or '(none)'} at "
            f"operating point {first['operating_point']}, whose calibration was not fitted on the site's images"
        )
    unknown = sorted(set(answered["operating_point"]) - set(reference.prevalence))
    if unknown and settings.adjust_prevalence:
        reasons.append(f"no reference prevalence for operating point {', '.join(unknown)}: estimated unadjusted")
    return reasons


def _answers(answered: pd.DataFrame) -> np.ndarray:
    """(probability, ood_score) of the answered rows at the version's operating point: the label-shift test's."""
    rows = answered[answered["operating_point"] == VERSION_POINT]
    return rows[["probability", "ood_score"]].to_numpy(dtype=np.float64).reshape(-1, 2)


def _scope_and_pixels(rows: pd.DataFrame) -> pd.Series:
    """Out of scope whose pixels were flagged too (its reason says both): out of distribution, as in drift.compare."""
    return (rows["status"] == OUT_OF_SCOPE) & rows["reason"].astype(str).str.contains("out of distribution: ")


# -- per period, site, version and subgroup ------------------------------------------------------------------------


def latest(log: pd.DataFrame) -> pd.DataFrame:
    """One row per image, version and site: the latest (a rerun of the same batch does not count twice)."""
    log = log.sort_values("time", kind="stable")
    keyed = log["sha256"].astype(str) != ""
    kept = log[keyed].drop_duplicates(["sha256", "model_version", "site"], keep="last")
    return pd.concat([kept, log[~keyed]]).sort_values("time", kind="stable").reset_index(drop=True)


def _groups(rows: pd.DataFrame):
    """(keys, subgroup, rows) for each period, site and version, then each DICOM subgroup value the rows carry."""
    for keys, group in rows.groupby(GROUP, sort=True):
        yield keys, "", group
        for name in SUBGROUPS:
            if name in group.columns:
                values = group[name].fillna("").astype(str)
                for value in sorted(set(values) - {""}):
                    yield keys, f"{name}={value}", group[values == value]


def _calibrations(answered: pd.DataFrame, p: np.ndarray, reference: Reference | None) -> list:
    """For :func:`_perturbed`: the rows at each operating point whose calibration's covariance is known."""
    found = []
    for name, (calibration, covariance) in (reference.calibrations if reference is not None else {}).items():
        rows = (answered["operating_point"] == name).to_numpy()
        if rows.any():
            bias, temperature = float(calibration.get("bias", 0.0)), float(calibration["temperature"])
            mean = np.array([1 / temperature, bias] if calibration["method"] == "platt" else [1 / temperature])
            found.append((rows, (logit(p[rows]) - bias) * temperature, mean, covariance))
    return found


def estimate_group(rows: pd.DataFrame, reference: Reference | None, settings: Settings, earlier=()) -> dict:
    """The estimate and verdict of one group of log rows (every status); ``earlier``: :func:`judge`'s."""
    status = rows["status"].astype(str)
    answered = rows[status == "ok"]
    p = answered["probability"].to_numpy(dtype=np.float64)
    called = p >= answered["threshold"].to_numpy(dtype=np.float64)
    known = reference.prevalence if reference is not None else {}
    prior = answered["operating_point"].map(known).to_numpy(dtype=np.float64)
    adjust = settings.adjust_prevalence and len(prior) > 0 and bool(np.isfinite(prior).all())
    used = replace(settings, adjust_prevalence=adjust)
    result = estimate_rows(p, called, np.nan_to_num(prior, nan=0.5), used, _calibrations(answered, p, reference))
    result |= {
        "images": len(rows),
        "readable": int((status != UNREADABLE).sum()),
        "share_out_of_distribution": float((status == OUT_OF_DISTRIBUTION).mean()),
        "share_out_of_scope": float((status == OUT_OF_SCOPE).mean()),
        "share_unreadable": float((status == UNREADABLE).mean()),
        "reference_prevalence": float(prior.mean()) if adjust else float("nan"),
    }
    reasons = judge(rows, result, reference, settings, earlier)
    return result | {"verdict": UNRELIABLE if reasons else RELIABLE, "reasons": "; ".join(reasons)}


def estimate(
    log: pd.DataFrame, references: dict[str, Reference], period: str = "week", settings: Settings = Settings()
) -> pd.DataFrame:
    """One row per period, site, version and subgroup (``""``: all of the group's images), in time order: the
    estimate with its bands, the expected counts, the shares, the verdict and its reasons. ``log``: prediction log
    rows (:func:`xray.monitoring.prediction_log.read_log`, or feedback's joined rows); ``references``: by version.
    No label is read."""
    rows = latest(log)
    for version in sorted(set(rows["model_version"].astype(str)) & set(references)) if len(rows) else ():
        if len(references[version].scores) and not len(references[version].labels):
            logger.warning(
                "version %s: its reference profile keeps no val labels, so the calibration test reads the "
                "probabilities alone, not ood_score (a profile fitted by the training pipeline of today keeps them)",
                version,
            )
    if "period" not in rows.columns:
        rows["period"] = period_of(rows["time"], period) if len(rows) else pd.Series(dtype=str)
    table, answers = [], {}  # answers: per site and version, each earlier period's at the version's point
    for keys, subgroup, group in _groups(rows):
        before = answers.setdefault(tuple(keys[1:]), []) if not subgroup else []
        earlier = np.concatenate(before[-(settings.window - 1) :]) if before and settings.window > 1 else ()
        result = estimate_group(group, references.get(str(keys[2])), settings, earlier)
        table.append(dict(zip(GROUP, keys)) | {"subgroup": subgroup} | result)
        if not subgroup:
            before.append(_answers(group[group["status"] == "ok"]))
    if not table:
        return pd.DataFrame(columns=[*GROUP, "subgroup", "verdict", "reasons"])
    return pd.DataFrame(table)
