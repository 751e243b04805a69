from typing import Annotated, Tuple

import keras
import mlflow
from zenml import step

from materializers import FiguresMaterializer, KerasModelMaterializer
from steps.caching import DOMAIN_CODE
from steps.tracking import log_config, log_images, mlflow_run
from xray.config.evaluate import EvaluateConfig
from xray.data import inputs
from xray.data.dataset import ValidatedDataset
from xray.evaluation import plots, recipes


@step(
    output_materializers={"calibrated_model": KerasModelMaterializer, "evaluation_figures": FiguresMaterializer},
    cache_policy=DOMAIN_CODE,
    experiment_tracker=True,
)
def evaluate_model(
    model: keras.Model,
    dataset: ValidatedDataset,
    spec: inputs.DatasetSpec,
    evaluate: EvaluateConfig,
    seed: int,
) -> Tuple[
    Annotated[keras.Model, "calibrated_model"],
    Annotated[recipes.Evaluation, "evaluation"],
    Annotated[plots.Figures, "evaluation_figures"],
]:
    """Calibration and threshold fitted on val only; test measured before and after calibration (xray.evaluation)."""
    result = recipes.evaluate_model(model, dataset, spec, evaluate, seed)
    report = result.report
    with mlflow_run():
        log_config(evaluate=evaluate)
        mlflow.set_tags(
            {"threshold_policy": report["threshold_policy"], "calibration": report["calibration"]["method"]}
        )
        mlflow.log_metrics(report["flat"])
        mlflow.log_dict({k: v for k, v in report.items() if k != "flat"}, "evaluation/report.json")
        log_images(result.figures)
    return result.calibrated, result.record(), plots.Figures(result.figures)
