import json
import logging
from datetime import datetime, timezone
from typing import Annotated, Tuple

import mlflow
import pandas as pd
from zenml import step

from steps.tracking import log_config, log_images, mlflow_run
from xray.config import MonitoringConfig, RegistryConfig
from xray.monitoring import drift
from xray.monitoring.report import figures, headline, post_alert, render_html
from xray.registry import store

logger = logging.getLogger(__name__)


@step(enable_cache=False, experiment_tracker=True)
def check_drift(
    predictions: pd.DataFrame,
    image_features: pd.DataFrame,
    ood_examples: dict,
    model_info: dict,
    source: str,
    monitoring: MonitoringConfig,
    registry: RegistryConfig,
    seed: int,
) -> Tuple[Annotated[dict, "drift_report"], Annotated[dict, "monitoring_plots"], Annotated[str, "report_html"]]:
    """Compare the batch with the version's reference profile; reads the registry, never writes to it."""
    profile, _ = store.load_reference_profile(registry.model_name, model_info["version"])
    report = drift.compare(profile, predictions, image_features, monitoring.drift_alpha, monitoring.permutations, seed)
    report |= {
        "model_uri": model_info["uri"],
        "model_version": model_info["version"],
        "source": source,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    report["headline"], _, report["next_step"] = headline(report)
    plots = figures(profile, predictions, image_features, ood_examples)
    page = render_html(report, plots)
    logger.info("%s; %s", report["headline"], report["next_step"])
    if report["drift_detected"] and post_alert(f"{report['headline']} (v{model_info['version']})"):
        logger.info("drift alert posted to the webhook")
    with mlflow_run():
        log_config(monitoring=monitoring)
        mlflow.set_tags(
            {"drift_detected": str(report["drift_detected"]).lower(), "model_version": model_info["version"]}
        )
        mlflow.log_metrics(
            {
                "drift_detected": float(report["drift_detected"]),
                "p_value": report["p_value"],
                "ood_fraction": report["ood_fraction"],
                "readable": report["readable"],
                "embedding_p_value": report["embedding"]["p_value"],
                "positive_rate": report["positive_rate"]["batch"],
            }
        )
        mlflow.log_text(json.dumps(report, indent=1, default=float), "monitoring/report.json")
        mlflow.log_text(page, "monitoring/report.html")
        log_images(plots, "monitoring")
    return report, plots, page
