"""Evaluation recipes: calibrate after training, measure a split, measure a labelled site.

Everything here is chosen on val (or, for a site, on the site's own calibration share) and only measured on the
images it reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import brier_score_loss, roc_auc_score

from xray import CLASS_NAMES
from xray.config.evaluate import EvaluateConfig
from xray.data.inputs import labels_of, make_spec_for_inference, select
from xray.data.manifest import subgroups_in
from xray.errors import DataQualityError
from xray.evaluation import metrics, plots
from xray.evaluation.calibration import (
    Calibration,
    expected_calibration_error,
    fit_calibration,
    logit,
    parameter_covariance,
    sigmoid,
)
from xray.model import gradcam
from xray.model.network import calibrated_model, logit_model, predict_paths

logger = logging.getLogger(__name__)


def calibrate_and_evaluate(
    y_val: np.ndarray, z_val: np.ndarray, y_test: np.ndarray, z_test: np.ndarray, evaluate: EvaluateConfig, seed: int
) -> dict:
    """Fit the calibration on val logits, choose the threshold on calibrated val, measure test before and after.

    Returns ``calibration`` (:class:`xray.evaluation.calibration.Calibration`), ``threshold``, ``threshold_policy``, the
    ``val`` and ``test`` reports on calibrated probabilities, ``test_uncalibrated`` (the raw sigmoid, same
    threshold policy on raw val), the calibrated probabilities ``p_val``/``p_test`` and ``flat`` metrics.
    """
    calibration = fit_calibration(y_val, z_val, evaluate.calibration)
    p_val, p_test = calibration.probability(z_val), calibration.probability(z_test)
    threshold, policy = metrics.choose_threshold(
        y_val, p_val, evaluate.threshold_policy, evaluate.min_sensitivity, evaluate.fixed_threshold
    )
    val_report = metrics.evaluate(y_val, p_val, threshold, evaluate.bootstrap_samples, seed)
    test_report = metrics.evaluate(y_test, p_test, threshold, evaluate.bootstrap_samples, seed)
    raw_val, raw_test = sigmoid(z_val), sigmoid(z_test)
    raw_threshold, _ = metrics.choose_threshold(
        y_val, raw_val, evaluate.threshold_policy, evaluate.min_sensitivity, evaluate.fixed_threshold
    )
    uncalibrated = {
        "threshold": raw_threshold,
        "auc": roc_auc_score(y_test, raw_test),
        "ece": expected_calibration_error(y_test, raw_test),
        "brier": brier_score_loss(y_test, raw_test),
        "at_0_5": metrics.at_threshold(np.asarray(y_test).astype(int), raw_test, 0.5),
    }
    flat = (
        metrics.flat_metrics("val", val_report)
        | metrics.flat_metrics("test", test_report)
        | {
            "threshold": threshold,
            "calibration_temperature": calibration.temperature,
            "calibration_bias": calibration.bias,
            "test_ece_uncalibrated": uncalibrated["ece"],
            "test_brier_uncalibrated": uncalibrated["brier"],
            "val_ece_uncalibrated": expected_calibration_error(y_val, raw_val),
            "threshold_uncalibrated": raw_threshold,
        }
    )
    return {
        "calibration": calibration,
        "threshold": threshold,
        "threshold_policy": policy,
        "val": val_report,
        "test": test_report,
        "test_uncalibrated": uncalibrated,
        "p_val": p_val,
        "p_test": p_test,
        "raw_test": raw_test,
        "flat": flat,
    }


SITE_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "ece")


def site_metrics(y: np.ndarray, p: np.ndarray, threshold: float, samples: int, seed: int) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity and ECE at ``threshold``, each with its 95% bootstrap CI."""
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        raise DataQualityError("a site evaluation needs labelled images of both classes (NORMAL/ and PNEUMONIA/)")
    report = metrics.evaluate(y, p, threshold, samples, seed)
    point = {
        "auc": report["auc"],
        "ece": report["ece"],
        **{k: report["at_threshold"][k] for k in ("accuracy", "sensitivity", "specificity")},
    }
    flat = {"threshold": float(threshold), "brier": report["brier"], "images": int(len(y))}
    for name in SITE_METRICS:
        low, high = report["ci95"][name]
        flat |= {name: float(point[name]), f"{name}_ci_low": low, f"{name}_ci_high": high}
    return flat


def grouped_split(groups: list[str], fraction: float, seed: int, y: np.ndarray) -> np.ndarray:
    """Boolean mask of the calibration share: whole groups (patients, or images when none is known), stratified
    so both classes are present on both sides when possible."""
    if not 0 < fraction < 1:
        raise ValueError(f"recalibrate fraction must be in (0, 1), not {fraction}")
    groups = np.asarray(groups)
    y = np.asarray(y).astype(int)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(groups), dtype=bool)
    # Group by patient; a group's class is its majority label, so classes are split in the same proportion.
    unique = np.unique(groups)
    label_of = {g: int(round(y[groups == g].mean())) for g in unique}
    for label in (0, 1):
        members = np.array([g for g in unique if label_of[g] == label])
        rng.shuffle(members)
        take = int(round(fraction * len(members)))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        mask |= np.isin(groups, members[:take])
    if mask.all() or not mask.any():
        raise DataQualityError("the site has too few images to hold out a calibration share")
    return mask


def recalibrated_site_metrics(
    y: np.ndarray, logits: np.ndarray, groups: list[str], fraction: float, evaluate: EvaluateConfig, seed: int
) -> dict:
    """Re-fit the calibration and re-choose the threshold on a grouped share of the site; measure on the rest."""
    y = np.asarray(y).astype(int)
    mask = grouped_split(groups, fraction, seed, y)
    counts = {name: int((y[mask] == label).sum()) for label, name in enumerate(CLASS_NAMES)}
    if min(counts.values()) < evaluate.min_recalibration_per_class:
        raise DataQualityError(
            f"not re-fitted: the site's calibration share ({fraction:g} of its patients) has {counts}, fewer than "
            f"evaluate.min_recalibration_per_class={evaluate.min_recalibration_per_class} of a class; use a larger "
            "site or a larger --recalibrate-fraction"
        )
    for side, name in ((mask, "calibration"), (~mask, "measurement")):
        if len(np.unique(y[side])) < 2:
            raise DataQualityError(
                f"the site's {name} share has images of one class only: use a larger site or another "
                "--recalibrate-fraction"
            )
    try:
        calibration = fit_calibration(y[mask], logits[mask], evaluate.calibration)
    except ValueError as error:
        raise DataQualityError(
            f"cannot re-fit the calibration on the site's {mask.sum()}-image share: {error}"
        ) from None
    p_fit, p_rest = calibration.probability(logits[mask]), calibration.probability(logits[~mask])
    threshold, policy = metrics.choose_threshold(
        y[mask], p_fit, evaluate.threshold_policy, evaluate.min_sensitivity, evaluate.fixed_threshold
    )
    measured = site_metrics(y[~mask], p_rest, threshold, evaluate.bootstrap_samples, seed)
    meets = measured["sensitivity_ci_low"] >= evaluate.min_sensitivity
    verdict = (
        f"held-out sensitivity {measured['sensitivity']:.3f} (95% CI {measured['sensitivity_ci_low']:.3f}-"
        f"{measured['sensitivity_ci_high']:.3f}, {int((~mask & (y == 1)).sum())} PNEUMONIA images) "
        + ("meets" if meets else "is not shown to meet")
        + f" evaluate.min_sensitivity {evaluate.min_sensitivity:g} (the CI's lower bound against the floor)"
    )
    if not meets:
        logger.warning("recalibrated operating point: %s; do not use it without more labelled images", verdict)
    return {
        "fraction": fraction,
        "calibration_images": int(mask.sum()),
        "calibration_counts": counts,
        "measured_images": int((~mask).sum()),
        "calibration": calibration.as_dict(),
        "calibration_covariance": parameter_covariance(calibration, logits[mask]),
        "threshold_policy": policy,
        "metrics": measured,
        "meets_policy": bool(meets),
        "policy": verdict,
    }


def evaluate_site(predictor, dataset, evaluate: EvaluateConfig, recalibrate_fraction: float | None, seed: int) -> dict:
    """A registered version (:class:`xray.serving.predictor.ChestXrayPredictor`) on a labelled site
    (:func:`xray.data.sites.load_site`).

    ``metrics``: at the version's own threshold and calibration. ``recalibrated`` (with a fraction): calibration
    and threshold re-fitted on a patient-grouped share of the site, measured on the rest. The logits come from the
    version's model (calibrated ones when the version is calibrated), so re-fitting composes with what it has.
    """
    y = labels_of(dataset.manifest)
    paths = dataset.paths(dataset.manifest)
    logits = predict_paths(logit_model(predictor.model), paths, make_spec_for_inference(predictor.image_size))
    probabilities = sigmoid(logits)
    result = {
        "metrics": site_metrics(y, probabilities, predictor.threshold, evaluate.bootstrap_samples, seed),
        "y": y,
        "probabilities": probabilities,
    }
    if recalibrate_fraction is not None:
        groups = dataset.manifest["patient_id"].tolist()
        result["recalibrated"] = recalibrated_site_metrics(y, logits, groups, recalibrate_fraction, evaluate, seed)
    return result


def site_operating_point(y: np.ndarray, p: np.ndarray, evaluate: EvaluateConfig) -> dict:
    """A site's own calibration (fitted on the logit of the version's calibrated probabilities, so it composes with
    the model's) and threshold (the same policy), both from that site's val images only."""
    calibration = fit_calibration(y, logit(p), evaluate.calibration)
    threshold, policy = metrics.choose_threshold(
        y,
        calibration.probability(logit(p)),
        evaluate.threshold_policy,
        evaluate.min_sensitivity,
        evaluate.fixed_threshold,
    )
    counts = {name: int((np.asarray(y) == label).sum()) for label, name in enumerate(CLASS_NAMES)}
    return {
        "calibration": calibration.as_dict(),
        "calibration_covariance": parameter_covariance(calibration, logit(p)),
        "threshold": float(threshold),
        "threshold_policy": policy,
        "fitted_on": f"val of this site at training ({counts})",
    }


def apply_operating_point(p: np.ndarray, point: dict) -> np.ndarray:
    """The version's calibrated probabilities through a site's own calibration (:func:`site_operating_point`)."""
    return Calibration(**point["calibration"]).probability(logit(p))


def per_site(val_rows, test_rows, p_val: np.ndarray, p_test: np.ndarray, threshold: float, evaluate, seed) -> dict:
    """Per site (the manifest's ``site``): its val and test counts, its test metrics with CIs at the version's
    operating point and, where its val has enough images of each class (evaluate.min_recalibration_per_class), its
    own operating point from its val and its test metrics there (with one site, the version's point is the site's).
    Empty when the rows carry no site (datasets prepared before sources)."""
    if "site" not in test_rows or "site" not in val_rows:
        return {}
    sites = list(dict.fromkeys(list(test_rows["site"]) + list(val_rows["site"])))
    if not sites:
        return {}
    y_val, y_test = labels_of(val_rows), labels_of(test_rows)
    result = {}
    for site in sites:
        in_val, in_test = (val_rows["site"] == site).to_numpy(), (test_rows["site"] == site).to_numpy()
        counts = {
            split: {name: int((y[mask] == label).sum()) for label, name in enumerate(CLASS_NAMES)}
            for split, y, mask in (("val", y_val, in_val), ("test", y_test, in_test))
        }
        entry = {"counts": counts, "test": None, "operating_point": None, "test_at_operating_point": None, "notes": []}
        if min(counts["test"].values()) > 0:
            entry["test"] = site_metrics(y_test[in_test], p_test[in_test], threshold, evaluate.bootstrap_samples, seed)
        else:
            entry["notes"].append(f"test not measured: its test split has {counts['test']}")
        if len(sites) == 1:
            entry["notes"].append("the only site: the version's operating point is its own")
        elif min(counts["val"].values()) >= evaluate.min_recalibration_per_class:
            try:
                point = site_operating_point(y_val[in_val], p_val[in_val], evaluate)
            except ValueError as error:
                entry["notes"].append(f"no operating point of its own: {error}")
            else:
                entry["operating_point"] = point
                if entry["test"] is not None:
                    entry["test_at_operating_point"] = site_metrics(
                        y_test[in_test],
                        apply_operating_point(p_test[in_test], point),
                        point["threshold"],
                        evaluate.bootstrap_samples,
                        seed,
                    )
        else:
            entry["notes"].append(
                f"no operating point of its own: its val has {counts['val']}, fewer than "
                f"evaluate.min_recalibration_per_class={evaluate.min_recalibration_per_class} of a class"
            )
        result[site] = entry
    return result


def by_subgroup(test_rows, y: np.ndarray, p: np.ndarray, threshold: float, evaluate, seed: int) -> dict:
    """Test metrics with CIs per value of each subgroup a DICOM header gives (xray.data.manifest.SUBGROUPS: age band,
    sex, view, manufacturer), at the version's operating point: ``{subgroup: {value: metrics}}``. A value with images
    of one class only has its counts and no metrics. Subgroups no test image has are left out."""
    result: dict[str, dict] = {}
    for name, value, mask in subgroups_in(test_rows):
        counts = {label: int((y[mask] == index).sum()) for index, label in enumerate(CLASS_NAMES)}
        result.setdefault(name, {})[value] = (
            site_metrics(y[mask], p[mask], threshold, evaluate.bootstrap_samples, seed) | {"counts": counts}
            if min(counts.values()) > 0
            else {"images": int(mask.sum()), "counts": counts}
        )
    return result


def site_flat(sites: dict) -> dict:
    """MLflow metrics of :func:`per_site`: ``site.<name>.test_auc`` ... and ``site.<name>.own_test_...``."""
    flat = {}
    for site, entry in sites.items():
        for prefix, measured in (("test", entry["test"]), ("own_test", entry["test_at_operating_point"])):
            for key, value in (measured or {}).items():
                flat[f"site.{site}.{prefix}_{key}"] = float(value)
        if entry["operating_point"]:
            flat[f"site.{site}.threshold"] = entry["operating_point"]["threshold"]
    return flat


def jsonable(value):
    """The same values as plain Python (numpy scalars and arrays too), so a record stores as JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    return value.item() if isinstance(value, np.generic) else value


@dataclass
class Evaluation:
    """What the training pipeline's evaluation hands on to the gate and the registration (a ZenML artifact): the
    report (``flat`` metrics, val and test reports, calibration, sites, subgroups), the val-chosen threshold and the
    calibrated val and test probabilities."""

    report: dict
    threshold: float
    val_probabilities: list[float]
    test_probabilities: list[float]

    @property
    def flat(self) -> dict:
        return self.report["flat"]

    @property
    def p_val(self) -> np.ndarray:
        return np.asarray(self.val_probabilities)

    @property
    def p_test(self) -> np.ndarray:
        return np.asarray(self.test_probabilities)


@dataclass
class ModelEvaluation:
    """What the training pipeline's evaluation produces: the calibrated model, the report (``flat`` metrics, val and
    test reports, calibration), the threshold, figures by name and the calibrated val/test probabilities."""

    calibrated: object
    report: dict
    threshold: float
    p_val: np.ndarray
    p_test: np.ndarray
    figures: dict = field(default_factory=dict)

    def record(self) -> Evaluation:
        return Evaluation(jsonable(self.report), float(self.threshold), jsonable(self.p_val), jsonable(self.p_test))


def evaluate_model(model, dataset, spec, evaluate: EvaluateConfig, seed: int) -> ModelEvaluation:
    """The evaluation recipe: logits on val and test, calibration and threshold fitted on val only, test measured
    before and after calibration, the figures a reviewer looks at (ROC/PR, confusion, reliability, Grad-CAM)."""
    val_rows, test_rows = (select(dataset.manifest, s, spec) for s in ("val", "test"))
    y_val, y_test = labels_of(val_rows), labels_of(test_rows)
    logits = logit_model(model)
    z_val, z_test = (predict_paths(logits, dataset.paths(rows), spec) for rows in (val_rows, test_rows))
    result = calibrate_and_evaluate(y_val, z_val, y_test, z_test, evaluate, seed)
    calibration, threshold, flat, p_test = result["calibration"], result["threshold"], result["flat"], result["p_test"]
    calibrated = calibrated_model(model, calibration.temperature, calibration.bias)
    figures = {
        "roc_pr_curves": plots.roc_pr(y_test, p_test, threshold),
        "confusion_matrix": plots.confusion(
            result["test"]["at_threshold"]["confusion_matrix"], f"test @ {threshold:.3f}"
        ),
        "calibration": plots.calibration(
            y_test, {"before calibration": sigmoid(z_test), f"after ({calibration.method} on val)": p_test}
        ),
        "gradcam_test_examples": gradcam.examples_grid(
            calibrated, dataset.paths(test_rows), y_test, p_test, threshold, spec.image_size
        ),
    }
    logger.info(
        "calibration (%s on val): temperature %.3f, bias %.3f; test ECE %.3f -> %.3f, Brier %.3f -> %.3f",
        calibration.method,
        calibration.temperature,
        calibration.bias,
        flat["test_ece_uncalibrated"],
        flat["test_ece"],
        flat["test_brier_uncalibrated"],
        flat["test_brier"],
    )
    logger.info(
        "threshold %.4f (%s); test AUC %.4f, accuracy %.4f, sensitivity %.4f, specificity %.4f",
        threshold,
        result["threshold_policy"],
        flat["test_auc"],
        flat["test_accuracy"],
        flat["test_sensitivity"],
        flat["test_specificity"],
    )
    sites = per_site(val_rows, test_rows, result["p_val"], p_test, threshold, evaluate, seed)
    for site, entry in sites.items():
        measured = entry["test"]
        logger.info(
            "site %s: test %s%s",
            site,
            f"AUC {measured['auc']:.4f} (95% CI {measured['auc_ci_low']:.4f}-{measured['auc_ci_high']:.4f}), "
            f"sensitivity {measured['sensitivity']:.3f}, specificity {measured['specificity']:.3f}, "
            f"ECE {measured['ece']:.3f}"
            if measured
            else "not measured",
            "; " + "; ".join(entry["notes"]) if entry["notes"] else "",
        )
    subgroups = by_subgroup(test_rows, y_test, p_test, threshold, evaluate, seed)
    report = {
        "flat": flat | site_flat(sites),
        "sites": sites,
        "subgroups": subgroups,
        "val": result["val"],
        "test": result["test"],
        "threshold_policy": result["threshold_policy"],
        "calibration": calibration.as_dict(),
        "test_uncalibrated": result["test_uncalibrated"],
    }
    return ModelEvaluation(calibrated, report, threshold, result["p_val"], p_test, figures)
