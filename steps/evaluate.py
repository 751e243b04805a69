from typing import Annotated, Tuple

import keras
import numpy as np
import mlflow
from PIL import Image
from zenml import step

from steps.caching import DOMAIN_CODE
from steps.tracking import log_config, log_images, mlflow_run
from xray import data as xdata
from xray import metrics as xmetrics
from xray import gradcam, plots
from xray.config import EvaluateConfig, RegistryConfig
from xray.dataset import ValidatedDataset
from xray.predict import predict_paths


@step(cache_policy=DOMAIN_CODE)
def evaluate_model(
    model: keras.Model, dataset: ValidatedDataset, spec: xdata.DatasetSpec, evaluate: EvaluateConfig,
    registry: RegistryConfig, seed: int,
) -> Tuple[
    Annotated[dict, "metrics"],
    Annotated[float, "threshold"],
    Annotated[Image.Image, "roc_pr_curves"],
    Annotated[Image.Image, "confusion_matrix"],
    Annotated[Image.Image, "calibration"],
    Annotated[Image.Image, "gradcam_test_examples"],
    Annotated[np.ndarray, "val_probabilities"],
]:
    """Threshold chosen on val only; test measured at that threshold and at 0.5."""
    val_rows, test_rows = (xdata.select(dataset.manifest, s, spec) for s in ("val", "test"))
    y_val, y_test = xdata.labels_of(val_rows), xdata.labels_of(test_rows)
    p_val, p_test = (predict_paths(model, dataset.paths(rows), spec) for rows in (val_rows, test_rows))
    threshold, policy = xmetrics.choose_threshold(y_val, p_val, evaluate.threshold_policy,
                                                  evaluate.min_sensitivity, evaluate.fixed_threshold)
    val_report = xmetrics.evaluate(y_val, p_val, threshold, evaluate.bootstrap_samples, seed)
    test_report = xmetrics.evaluate(y_test, p_test, threshold, evaluate.bootstrap_samples, seed)
    flat = xmetrics.flat_metrics("val", val_report) | xmetrics.flat_metrics("test", test_report) | {"threshold": threshold}
    figures = {
        "roc_pr_curves": plots.roc_pr(y_test, p_test, threshold),
        "confusion_matrix": plots.confusion(test_report["at_threshold"]["confusion_matrix"], f"test @ {threshold:.3f}"),
        "calibration": plots.calibration(y_test, p_test),
        "gradcam_test_examples": gradcam.confident_examples_grid(model, dataset.paths(test_rows), y_test, p_test,
                                                                 threshold, spec.image_size),
    }
    print(f"threshold {threshold:.4f} ({policy}); test AUC {flat['test_auc']:.4f}, accuracy {flat['test_accuracy']:.4f}, "
          f"sensitivity {flat['test_sensitivity']:.4f}, specificity {flat['test_specificity']:.4f}", flush=True)
    with mlflow_run(registry):
        log_config(evaluate=evaluate)
        mlflow.set_tag("threshold_policy", policy)
        mlflow.log_metrics(flat)
        mlflow.log_dict({"val": val_report, "test": test_report, "threshold_policy": policy}, "evaluation/report.json")
        log_images(figures)
    report = {"flat": flat, "val": val_report, "test": test_report, "threshold_policy": policy}
    return (report, threshold, figures["roc_pr_curves"], figures["confusion_matrix"], figures["calibration"],
            figures["gradcam_test_examples"], p_val)

