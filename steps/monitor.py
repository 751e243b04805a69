"""Steps of the monitoring pipeline: a batch scored by a registered version, then compared with its reference
profile (xray.monitoring). Reads the registry, never writes to it."""

import json
import logging
from datetime import datetime, timezone
from typing import Annotated, Tuple

import mlflow
import pandas as pd
from zenml import step

from materializers import FiguresMaterializer
from steps.records import MonitoringReport
from steps.tracking import log_config, log_images, mlflow_run
from steps.version import load
from xray.evaluation.plots import Figures
from xray.monitoring import drift, ood
from xray.monitoring.alerts import post_alert
from xray.monitoring.report import figures, headline, render_html
from xray.registry import store
from xray.requests import MonitoringRequest
from xray.serving import batch

logger = logging.getLogger(__name__)


@step(enable_cache=False, experiment_tracker=True, output_materializers={"ood_examples": FiguresMaterializer})
def score_batch(
    model_info: store.ModelInfo, request: MonitoringRequest
) -> Tuple[
    Annotated[pd.DataFrame, "predictions"],
    Annotated[pd.DataFrame, "image_features"],
    Annotated[Figures, "ood_examples"],
]:
    """The batch's predictions, out-of-distribution features and its most unusual images."""
    config = request.config
    assert request.images is not None  # a batch's run; from_log runs estimate_from_log instead
    predictor = load(model_info, config.registry.model_name, config.inference.runtime)
    limits, attempts = config.data.limits, config.s3.max_attempts
    wanted = batch.Wanted(keep=True, examples=8)
    result = batch.predict_source(
        predictor, request.images, config.inference, limits=limits, max_attempts=attempts, wanted=wanted
    )
    logger.info("scored %s: %s", request.images, result.summary())
    examples = Figures({name: picture for _, name, picture in result.examples})
    return result.table, ood.feature_table(result.features, predictor.profile), examples


@step(enable_cache=False, experiment_tracker=True, output_materializers={"monitoring_plots": FiguresMaterializer})
def check_drift(
    predictions: pd.DataFrame,
    image_features: pd.DataFrame,
    ood_examples: Figures,
    model_info: store.ModelInfo,
    request: MonitoringRequest,
) -> Tuple[Annotated[MonitoringReport, "monitoring_report"], Annotated[Figures, "monitoring_plots"]]:
    """Compare the batch with the version's reference profile; post a detected drift to the alert webhook."""
    monitoring, seed = request.config.monitoring, request.config.seed
    profile, _ = store.load_reference_profile(request.config.registry.model_name, model_info.version)
    report = drift.compare(profile, predictions, image_features, monitoring.drift_alpha, monitoring.permutations, seed)
    report |= {"model_uri": model_info.uri, "model_version": model_info.version, "source": request.images}
    report["generated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["headline"], _, report["next_step"] = headline(report)
    plots = figures(profile, predictions, image_features, ood_examples.images)
    page = render_html(report, plots)
    logger.info("%s; %s", report["headline"], report["next_step"])
    if report["drift_detected"] and post_alert(f"{report['headline']} (v{model_info.version})"):
        logger.info("drift alert posted to the webhook")
    with mlflow_run():
        log_config(monitoring=monitoring)
        mlflow.set_tags({"drift_detected": str(report["drift_detected"]).lower(), "model_version": model_info.version})
        measured = {"drift_detected": float(report["drift_detected"]), "p_value": report["p_value"]}
        measured |= {"ood_fraction": report["ood_fraction"], "readable": report["readable"]}
        measured |= {
            "embedding_p_value": report["embedding"]["p_value"],
            "positive_rate": report["positive_rate"]["batch"],
        }
        mlflow.log_metrics(measured)
        mlflow.log_text(json.dumps(report, indent=1, default=float), "monitoring/report.json")
        mlflow.log_text(page, "monitoring/report.html")
        log_images(plots, "monitoring")
    return MonitoringReport(json.loads(json.dumps(report, default=float)), page), Figures(plots)
