from typing import Annotated, Tuple

import keras
import mlflow
import numpy as np
from PIL import Image
from zenml import step

from materializers import KerasModelMaterializer
from steps.caching import DOMAIN_CODE
from steps.tracking import log_config, log_images, mlflow_run
from xray.config import EvaluateConfig
from xray.data import inputs
from xray.data.dataset import ValidatedDataset
from xray.evaluation import recipes


@step(
    output_materializers={"calibrated_model": KerasModelMaterializer}, cache_policy=DOMAIN_CODE, experiment_tracker=True
)
def evaluate_model(
    model: keras.Model,
    dataset: ValidatedDataset,
    spec: inputs.DatasetSpec,
    evaluate: EvaluateConfig,
    seed: int,
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
    """Calibration and threshold fitted on val only; test measured before and after calibration (xray.evaluation)."""
    result = recipes.evaluate_model(model, dataset, spec, evaluate, seed)
    report, figures = result.report, result.figures
    with mlflow_run():
        log_config(evaluate=evaluate)
        mlflow.set_tags(
            {"threshold_policy": report["threshold_policy"], "calibration": report["calibration"]["method"]}
        )
        mlflow.log_metrics(report["flat"])
        mlflow.log_dict({k: v for k, v in report.items() if k != "flat"}, "evaluation/report.json")
        log_images(figures)
    return (
        result.calibrated,
        report,
        result.threshold,
        figures["roc_pr_curves"],
        figures["confusion_matrix"],
        figures["calibration"],
        figures["gradcam_test_examples"],
        result.p_val,
        result.p_test,
    )
