"""Performance before the labels (xray.monitoring.performance): the prediction log's calibrated probabilities as
sensitivity, specificity, PPV, NPV and AUC per period, site and version, with bands and a verdict (no label read);
and, once labels exist, the estimate beside feedback's realised metrics."""

import json
import logging
import time
from typing import Annotated, Tuple

import mlflow
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from zenml import step

from materializers import FiguresMaterializer
from steps.logstore import log_store
from steps.records import EstimatedPerformance, FeedbackSummary
from steps.tracking import log_config, log_images, mlflow_run
from xray.config.pipeline import PipelineConfig
from xray.errors import ConfigError
from xray.evaluation.plots import Figures
from xray.monitoring import prediction_log
from xray.monitoring.alerts import post_alert
from xray.monitoring.performance import comparison, estimation
from xray.monitoring.report import estimated_figures
from xray.registry import store
from xray.requests import FeedbackRequest, MonitoringRequest

logger = logging.getLogger(__name__)


def references(config: PipelineConfig, versions) -> dict[str, estimation.Reference]:
    """Each version's reference (its reference profile and its sites' operating points); a version without one is
    left out, said in a warning, and its estimates say "no reference profile" in their verdict."""
    found = {}
    for version in sorted({str(v) for v in versions}):
        try:
            profile, _ = store.load_reference_profile(config.registry.model_name, version)
        except ConfigError as error:
            logger.warning("v%s: %s", version, error)
            continue
        found[version] = estimation.Reference.of(
            profile, store.load_operating_points(config.registry.model_name, version)
        )
    return found


def settings(config: PipelineConfig) -> estimation.Settings:
    monitoring = config.monitoring
    return estimation.Settings(
        config.evaluate.bootstrap_samples, monitoring.drift_alpha, monitoring.feedback_min_per_class, seed=config.seed
    )


@step(enable_cache=False, experiment_tracker=True, output_materializers={"estimated_plots": FiguresMaterializer})
def estimate_from_log(
    request: MonitoringRequest,
) -> Tuple[
    Annotated[pd.DataFrame, "estimates"],
    Annotated[EstimatedPerformance, "estimated_performance"],
    Annotated[Figures, "estimated_plots"],
]:
    """The whole prediction log estimated per period, site and version; a reliable estimated drop alerts."""
    config = request.config
    monitoring, evaluate, registry = config.monitoring, config.evaluate, config.registry
    resolved = log_store(monitoring.prediction_log)
    if resolved is None:
        raise ConfigError("monitoring.prediction_log is off: there are no logged predictions to estimate from")
    root, files = resolved
    log = prediction_log.read_log(root, store=files)
    known = references(config, log["model_version"].unique())
    table = estimation.estimate(log, known, monitoring.feedback_period, settings(config))
    test_auc = store.versions_test_auc(MlflowClient(registry.tracking_uri), registry.model_name, known)
    alerts = comparison.degradations(table, evaluate.min_sensitivity, test_auc, registry.margin)
    for line in alerts:
        logger.warning(line)
        post_alert(line)
    floor = min(test_auc.values()) - registry.margin if test_auc else None
    plots = estimated_figures(table, evaluate.min_sensitivity, floor)
    summary = comparison.summary(table, alerts) | {
        "period": monitoring.feedback_period,
        "logged_predictions": len(log),
        "prediction_log": prediction_log.without_credentials(root),
    }
    summary = json.loads(json.dumps(summary, default=float))
    with mlflow_run() as run:
        log_config(monitoring=monitoring)
        log_series(run.info.run_id, comparison.metrics(table))
        mlflow.log_metric("estimated_alerts", float(len(alerts)))
        mlflow.log_text(table.to_csv(index=False), "estimated/estimates.csv")
        log_images(plots, "estimated")
    if table.empty:
        logger.warning("the prediction log at %s has no rows to estimate", summary["prediction_log"])
    return table, EstimatedPerformance(summary, comparison.lines(table)), Figures(plots)


def log_series(run_id: str, metrics: list[tuple[str, float, int]]) -> None:
    """``estimated_*`` metrics, a period a step (MLflow takes at most 1,000 a call)."""
    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, step) for key, value, step in metrics]
    for start in range(0, len(batch), 1000):
        MlflowClient().log_batch(run_id, metrics=batch[start : start + 1000])


@step(enable_cache=False, experiment_tracker=True, output_materializers={"estimated_plots": FiguresMaterializer})
def compare_with_estimate(
    labelled_predictions: pd.DataFrame,
    performance: pd.DataFrame,
    feedback_summary: FeedbackSummary,
    request: FeedbackRequest,
) -> Tuple[Annotated[pd.DataFrame, "estimated_vs_realised"], Annotated[Figures, "estimated_plots"]]:
    """The labelled predictions estimated as if no label had come (the same images, period, site and version), beside
    their realised metrics: one plot per metric, estimate with its band, realised with its interval."""
    config = request.config
    known = references(config, labelled_predictions["model_version"].unique())
    table = estimation.estimate(labelled_predictions, known, feedback_summary.summary["period"], settings(config))
    both = comparison.side_by_side(table, performance)
    plots = estimated_figures(both, config.evaluate.min_sensitivity, feedback_summary.summary.get("auc_floor"))
    with mlflow_run():
        mlflow.log_text(both.to_csv(index=False), "feedback/estimated_vs_realised.csv")
        log_images(plots, "feedback")
    return both, Figures(plots)
