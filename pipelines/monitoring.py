"""Monitoring: a registered version + a batch of images -> per-image out-of-distribution checks and a drift report;
or (--from-log) the prediction log -> performance estimated per period, site and version with a verdict, no label
read. Its launch and its summary."""

import json
import logging

from zenml import pipeline
from zenml.enums import ExecutionMode

from pipelines import launch
from steps.estimate import estimate_from_log
from steps.monitor import check_drift, score_batch
from steps.tracking import mark_run_failed
from steps.version import resolve_model_version
from xray.requests import MonitoringRequest

logger = logging.getLogger(__name__)


@pipeline(name="chest_xray_monitoring", execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def monitoring_pipeline(request: MonitoringRequest) -> None:
    if request.from_log:
        estimate_from_log(request=request)
        return
    model_info = resolve_model_version(model_version=request.model_version, registry=request.config.registry)
    predictions, features, examples = score_batch(model_info, request=request)
    check_drift(predictions, features, examples, model_info, request=request)


def run_monitoring(request: MonitoringRequest) -> dict:
    """``monitor``: the batch against the version's reference profile; report, plots and predictions in the output.
    ``--from-log``: the estimates, their report and plots in the output, one line per group in the log."""
    experiment = request.config.monitoring.experiment_name
    done = summarize_estimates if request.from_log else summarize
    return launch.launch(monitoring_pipeline, request, experiment, lambda run, load: done(load, request))


def summarize_estimates(load, request: MonitoringRequest) -> dict:
    """The summary line of --from-log (counts, alerts, every group's estimate, band and verdict); each group's line
    logged; estimates.csv, report.json and the estimated_*.png plots written to the output."""
    output = request.output
    output.mkdir(parents=True, exist_ok=True)
    table = load("estimate_from_log", "estimates")
    result = load("estimate_from_log", "estimated_performance")
    for line in result.lines:
        logger.info("estimated %s", line)
    table.to_csv(output / "estimates.csv", index=False)
    (output / "report.json").write_text(json.dumps(result.summary, indent=1) + "\n")
    for name, image in load("estimate_from_log", "estimated_plots").images.items():
        image.save(output / f"{name}.png")
    return result.summary | {"report": str(output / "report.json")}


def summarize(load, request: MonitoringRequest) -> dict:
    """The summary line; report.html, report.json, the plots and predictions.csv are written to the output."""
    output = request.output
    output.mkdir(parents=True, exist_ok=True)
    result = load("check_drift", "monitoring_report")
    report = result.report
    load("score_batch", "predictions").to_csv(output / "predictions.csv", index=False)
    (output / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (output / "report.html").write_text(result.html)
    for name, image in load("check_drift", "monitoring_plots").images.items():
        image.save(output / f"{name}.png")
    return {
        "drift_detected": report["drift_detected"],
        "p_value": report["p_value"],
        "ood_fraction": report["ood_fraction"],
        "images": report["images"],
        "readable": report["readable"],
        "ood_images": report["ood_images"],
        "out_of_scope_images": report.get("out_of_scope_images", 0),
        "reference_ood_fraction": report["reference_ood_fraction"],
        "embedding_p_value": report["embedding"]["p_value"],
        "positive_rate": report["positive_rate"]["batch"],
        "reference_positive_rate": report["positive_rate"]["reference"],
        "model_uri": report["model_uri"],
        "model_version": report["model_version"],
        "report": str(output / "report.html"),
        "headline": report["headline"],
    }
