import logging
from typing import Annotated, Tuple

import keras
import mlflow
import numpy as np
from PIL import Image
from zenml import step

from materializers import KerasModelMaterializer
from steps.caching import DOMAIN_CODE
from steps.tracking import log_config, log_images, mlflow_run
from xray import data as xdata
from xray import gradcam, plots
from xray.calibration import sigmoid
from xray.config import EvaluateConfig, RegistryConfig
from xray.dataset import ValidatedDataset
from xray.evaluation import calibrate_and_evaluate
from xray.model import calibrated_model, logit_model
from xray.predict import predict_paths

logger = logging.getLogger(__name__)


@step(output_materializers={"calibrated_model": KerasModelMaterializer}, cache_policy=DOMAIN_CODE, experiment_tracker=True)
def evaluate_model(
    model: keras.Model, dataset: ValidatedDataset, spec: xdata.DatasetSpec, evaluate: EvaluateConfig,
    registry: RegistryConfig, seed: int,
) -> Tuple[
    Annotated[keras.Model, "calibrated_model"],
    Annotated[dict, "metrics"],
    Annotated[float, "threshold"],
    Annotated[Image.Image, "roc_pr_curves"],
    Annotated[Image.Image, "confusion_matrix"],
    Annotated[Image.Image, "calibration"],
    Annotated[Image.Image, "gradcam_test_examples"],
    Annotated[np.ndarray, "val_probabilities"],
    Annotated[np.ndarray, "test_probabilities"],
]:
    """Calibration and threshold fitted on val only; test measured before and after calibration."""
    val_rows, test_rows = (xdata.select(dataset.manifest, s, spec) for s in ("val", "test"))
    y_val, y_test = xdata.labels_of(val_rows), xdata.labels_of(test_rows)
    logits = logit_model(model)
    z_val, z_test = (predict_paths(logits, dataset.paths(rows), spec) for rows in (val_rows, test_rows))
    result = calibrate_and_evaluate(y_val, z_val, y_test, z_test, evaluate, seed)
    calibration, threshold, flat = result["calibration"], result["threshold"], result["flat"]
    calibrated = calibrated_model(model, calibration.temperature, calibration.bias)
    p_test = result["p_test"]
    figures = {
        "roc_pr_curves": plots.roc_pr(y_test, p_test, threshold),
        "confusion_matrix": plots.confusion(result["test"]["at_threshold"]["confusion_matrix"], f"test @ {threshold:.3f}"),
        "calibration": plots.calibration(y_test, {"before calibration": sigmoid(z_test),
                                                  f"after ({calibration.method} on val)": p_test}),
        "gradcam_test_examples": gradcam.confident_examples_grid(calibrated, dataset.paths(test_rows), y_test, p_test,
                                                                 threshold, spec.image_size),
    }
    logger.info("calibration (%s on val): temperature %.3f, bias %.3f; test ECE %.3f -> %.3f, Brier %.3f -> %.3f",
                calibration.method, calibration.temperature, calibration.bias, flat["test_ece_uncalibrated"],
                flat["test_ece"], flat["test_brier_uncalibrated"], flat["test_brier"])
    logger.info("threshold %.4f (%s); test AUC %.4f, accuracy %.4f, sensitivity %.4f, specificity %.4f", threshold,
                result["threshold_policy"], flat["test_auc"], flat["test_accuracy"], flat["test_sensitivity"],
                flat["test_specificity"])
    report = {"flat": flat, "val": result["val"], "test": result["test"], "threshold_policy": result["threshold_policy"],
              "calibration": calibration.as_dict(), "test_uncalibrated": result["test_uncalibrated"]}
    with mlflow_run():
        log_config(evaluate=evaluate)
        mlflow.set_tags({"threshold_policy": result["threshold_policy"], "calibration": calibration.method})
        mlflow.log_metrics(flat)
        mlflow.log_dict({k: v for k, v in report.items() if k != "flat"}, "evaluation/report.json")
        log_images(figures)
    return (calibrated, report, threshold, figures["roc_pr_curves"], figures["confusion_matrix"],
            figures["calibration"], figures["gradcam_test_examples"], result["p_val"], p_test)
