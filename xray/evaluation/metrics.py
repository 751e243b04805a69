"""Threshold policy and test metrics with bootstrap confidence intervals.

The threshold is chosen on val only; test is only ever measured.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

from xray import CLASS_NAMES
from xray.evaluation.calibration import expected_calibration_error


def choose_threshold(
    y_val: np.ndarray, p_val: np.ndarray, policy: str, min_sensitivity: float = 0.95, fixed: float = 0.5
) -> tuple[float, str]:
    """Return (threshold, one-line description of how it was chosen).

    ``min_sensitivity``: the highest-specificity threshold whose val
    sensitivity is at least ``min_sensitivity`` (missing a pneumonia costs
    more than a false alarm). ``youden``: max(sensitivity + specificity - 1).
    """
    if policy == "fixed":
        return float(fixed), f"fixed at {fixed:g}"
    if len(np.unique(y_val)) < 2:
        raise ValueError("val must contain both classes to choose a threshold")
    # Every distinct score is a candidate: the default drop_intermediate=True keeps only the ROC's corners, and the
    # top corner of a vertical stretch is its lowest threshold, which would call more images PNEUMONIA than the
    # same val specificity needs.
    fpr, tpr, thresholds = roc_curve(y_val, p_val, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if policy == "youden":
        best = int(np.argmax(tpr - fpr))
        return float(thresholds[best]), f"youden on val: sensitivity {tpr[best]:.3f}, specificity {1 - fpr[best]:.3f}"
    ok = np.flatnonzero(tpr >= min_sensitivity - 1e-12)
    # roc_curve orders thresholds high -> low, so the first qualifying point has the lowest fpr and, among the
    # thresholds with that fpr, is the highest.
    best = int(ok[0])
    return float(thresholds[best]), (
        f"highest val specificity ({1 - fpr[best]:.3f}) with val sensitivity {tpr[best]:.3f} >= {min_sensitivity:g}"
    )


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    predicted = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y.astype(int), predicted, labels=[0, 1]).ravel()
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    result = {
        "accuracy": (tp + tn) / len(y),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }
    for label, (hits, misses, false_alarms) in zip(CLASS_NAMES, [(tn, fp, fn), (tp, fn, fp)]):
        precision = hits / (hits + false_alarms) if hits + false_alarms else 0.0
        recall = hits / (hits + misses) if hits + misses else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result.update({f"precision_{label}": precision, f"recall_{label}": recall, f"f1_{label}": f1})
    return {k: (float(v) if not isinstance(v, list) else v) for k, v in result.items()}


def rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: the mean rank of the positives (ties share their average rank), which
    is the area under the ROC's trapezoids, so it equals sklearn's ``roc_auc_score`` (to float rounding) without its
    input validation, which costs 20 times the computation in a bootstrap of thousands of resamples. ``y``: 0/1, both
    classes present."""
    positives = y == 1
    count = int(positives.sum())
    others = len(y) - count
    ranks = rankdata(p)
    return float((ranks[positives].sum() - count * (count + 1) / 2) / (count * others))


def bootstrap_ci(
    y: np.ndarray, p: np.ndarray, thresholds: tuple[float, ...], samples: int, seed: int
) -> list[dict[str, tuple[float, float]]]:
    """95% percentile intervals for AUC, ECE, accuracy, sensitivity and specificity at each threshold.

    One set of image resamples serves every threshold, so the operating points
    are judged on identical bootstraps and each resample's AUC is computed once.
    """
    rng = np.random.default_rng(seed)
    probabilities = bool(np.all((p >= 0) & (p <= 1)))  # ECE only means something for probabilities
    aucs: list[float] = []
    eces: list[float] = []
    rates = [{"accuracy": [], "sensitivity": [], "specificity": []} for _ in thresholds]
    for _ in range(samples):
        index = rng.integers(0, len(y), len(y))
        ys, ps = y[index], p[index]
        positives, negatives = ys == 1, ys == 0
        if not positives.any() or not negatives.any():
            continue
        aucs.append(rank_auc(ys, ps))
        if probabilities:
            eces.append(expected_calibration_error(ys, ps))
        for threshold, stats in zip(thresholds, rates):
            hits = ps >= threshold
            stats["accuracy"].append((hits == positives).mean())
            stats["sensitivity"].append(hits[positives].mean())
            stats["specificity"].append((~hits[negatives]).mean())

    def interval(values: list[float]) -> tuple[float, float]:
        return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))

    common = {"auc": interval(aucs)} | ({"ece": interval(eces)} if probabilities else {})
    return [common | {k: interval(v) for k, v in stats.items()} for stats in rates]


def evaluate(y: np.ndarray, p: np.ndarray, threshold: float, bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """Everything reported for one split: ranking metrics, both operating points, CIs."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    report = {
        "n": int(len(y)),
        "auc": float(roc_auc_score(y, p)),
        "average_precision": float(average_precision_score(y, p)),
        "brier": float(brier_score_loss(y, p)),
        "ece": expected_calibration_error(y, p),
        "threshold": float(threshold),
        "at_threshold": at_threshold(y, p, threshold),
        "at_0_5": at_threshold(y, p, 0.5),
    }
    report["ci95"], report["ci95_at_0_5"] = bootstrap_ci(y, p, (threshold, 0.5), bootstrap_samples, seed)
    return report


def flat_metrics(prefix: str, report: dict) -> dict[str, float]:
    """MLflow-friendly scalars: test_auc, test_sensitivity (at the chosen threshold), test_sensitivity_at_0_5, ..."""
    flat = {f"{prefix}_{k}": report[k] for k in ("auc", "average_precision", "brier", "ece")}
    for suffix, block in (("", report["at_threshold"]), ("_at_0_5", report["at_0_5"])):
        for key, value in block.items():
            if key != "confusion_matrix":
                flat[f"{prefix}_{key}{suffix}"] = value
    for suffix, block in (("", report.get("ci95", {})), ("_at_0_5", report.get("ci95_at_0_5", {}))):
        for key, (low, high) in block.items():
            if suffix and key in ("auc", "ece"):
                continue  # neither depends on the threshold
            flat[f"{prefix}_{key}{suffix}_ci_low"], flat[f"{prefix}_{key}{suffix}_ci_high"] = low, high
    return flat


def paired_auc_difference(
    y: np.ndarray, p_challenger: np.ndarray, p_champion: np.ndarray, samples: int, seed: int
) -> dict[str, float]:
    """AUC(challenger) - AUC(champion) on the same images, with a 95% CI from shared resamples.

    Each bootstrap resample of the images scores both models, so the interval is of the paired difference: what
    the two models have in common (which images are hard) cancels, as it does in DeLong's paired test.
    """
    y = np.asarray(y).astype(int)
    p_challenger, p_champion = np.asarray(p_challenger, np.float64), np.asarray(p_champion, np.float64)
    if not len(y) == len(p_challenger) == len(p_champion):
        raise ValueError("both models must be scored on the same images")
    if len(np.unique(y)) < 2:
        raise ValueError("the paired AUC difference needs both classes")
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(samples):
        index = rng.integers(0, len(y), len(y))
        ys = y[index]
        if ys.min() == ys.max():
            continue
        differences.append(rank_auc(ys, p_challenger[index]) - rank_auc(ys, p_champion[index]))
    challenger, champion = roc_auc_score(y, p_challenger), roc_auc_score(y, p_champion)
    return {
        "auc_challenger": float(challenger),
        "auc_champion": float(champion),
        "auc_difference": float(challenger - champion),
        "resamples": len(differences),
        "auc_difference_ci_low": float(np.percentile(differences, 2.5)),
        "auc_difference_ci_high": float(np.percentile(differences, 97.5)),
    }
