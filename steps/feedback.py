"""The feedback step: labels joined to the prediction log, performance per period, site and version, alerts."""

import json
import logging
from pathlib import Path
from typing import Annotated, Tuple

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from zenml import log_metadata, step

from steps.logstore import log_store
from steps.records import FeedbackSummary
from steps.tracking import log_config, log_images, mlflow_run
from xray.errors import ConfigError
from xray.monitoring import prediction_log
from xray.monitoring.alerts import post_alert
from xray.monitoring.performance import feedback
from xray.monitoring.report import feedback_figures
from xray.registry import store
from xray.requests import FeedbackRequest

logger = logging.getLogger(__name__)


@step(enable_cache=False, experiment_tracker=True)
def assess_feedback(
    request: FeedbackRequest,
) -> Tuple[
    Annotated[pd.DataFrame, "performance"],
    Annotated[pd.DataFrame, "labelled_predictions"],
    Annotated[FeedbackSummary, "feedback_summary"],
]:
    """Read the labels and the whole log, join, measure, and post any degradation to the webhook."""
    config = request.config
    monitoring, evaluate, registry, seed = config.monitoring, config.evaluate, config.registry, config.seed
    labels, period, site = request.labels, request.period or monitoring.feedback_period, request.site
    resolved = log_store(monitoring.prediction_log)
    if resolved is None:
        raise ConfigError("monitoring.prediction_log is off: there are no logged predictions to join labels to")
    root, files = resolved
    table = feedback.read_labels(Path(labels))
    log = prediction_log.read_log(root, store=files)
    joined = feedback.join(table, log, period, site)
    result = feedback.performance(joined, evaluate.bootstrap_samples, seed)
    test_auc = store.versions_test_auc(
        MlflowClient(registry.tracking_uri), registry.model_name, result["model_version"].unique()
    )
    alerts = feedback.degradations(
        result, evaluate.min_sensitivity, test_auc, registry.margin, monitoring.feedback_min_per_class
    )
    summary = joined.counts() | {
        "key": joined.key,
        "period": period,
        "site": site or "",
        "logged_predictions": len(log),
        "groups": len(result),
        "alerts": alerts,
        "test_auc": test_auc,
        # The AUC alert line of the plot: the lowest version's (each version alerts against its own).
        "auc_floor": min(test_auc.values()) - registry.margin if test_auc else None,
    }
    if joined.unmatched:
        logger.warning("%d labels match no logged prediction", joined.unmatched)
    if joined.conflicting:
        logger.warning("%d images were given both labels: left out", joined.conflicting)
    for line in alerts:
        logger.warning(line)
        post_alert(line)
    plots = feedback_figures(result, evaluate.min_sensitivity, summary["auc_floor"])
    with mlflow_run():
        log_config(monitoring=monitoring)
        mlflow.log_params({"labels": Path(labels).name, "period": period, "site": site or "", "key": joined.key})
        mlflow.log_metrics({k: float(v) for k, v in joined.counts().items()} | {"alerts": float(len(alerts))})
        mlflow.set_tag("degraded", str(bool(alerts)).lower())
        mlflow.log_text(result.to_csv(index=False), "feedback/performance.csv")
        mlflow.log_text(json.dumps(summary, indent=1, default=float), "feedback/summary.json")
        log_images(plots, "feedback")
    log_metadata(metadata={k: v for k, v in summary.items() if isinstance(v, (int, str))})
    logger.info("feedback: %s", {k: v for k, v in summary.items() if k != "alerts"})
    return result, joined.rows, FeedbackSummary(summary)
