"""Feedback: a labels file + the prediction log -> performance per period, site and version, and alerts, with the
estimate of the same predictions beside it; its launch and its summary."""

import json
from pathlib import Path

import yaml
from zenml import pipeline
from zenml.enums import ExecutionMode

from pipelines import launch
from steps.estimate import compare_with_estimate
from steps.feedback import assess_feedback
from steps.tracking import mark_run_failed
from xray.monitoring.performance import feedback
from xray.monitoring.performance.estimation import RELIABLE
from xray.monitoring.performance.feedback import read_labels
from xray.monitoring.report import feedback_figures
from xray.requests import FeedbackRequest


@pipeline(name="chest_xray_feedback", execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def feedback_pipeline(request: FeedbackRequest) -> None:
    performance, labelled, summary = assess_feedback(request=request)
    compare_with_estimate(labelled, performance, summary, request=request)


def run_feedback(request: FeedbackRequest) -> dict:
    """``feedback``: a labels file joined to the prediction log; the file is validated here first, so a malformed one
    is one line and no run."""
    read_labels(request.labels)
    experiment = request.config.monitoring.feedback_experiment_name
    min_sensitivity = request.config.evaluate.min_sensitivity
    return launch.launch(
        feedback_pipeline, request, experiment, lambda run, load: summarize(load, request.output, min_sensitivity)
    )


def summarize(load, output: Path, min_sensitivity: float) -> dict:
    """The summary line; performance.csv, report.json, one plot per metric, the estimate beside the realised metrics
    (estimated_vs_realised.csv, estimated_<metric>.png) and the labelled images as training sources (sources/<n>.csv
    + sources.yaml, for data.sources) are written to ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    table = load("assess_feedback", "performance")
    rows = load("assess_feedback", "labelled_predictions")
    summary = load("assess_feedback", "feedback_summary").summary
    table.to_csv(output / "performance.csv", index=False)
    (output / "report.json").write_text(json.dumps(summary | {"performance": table.to_dict("records")}, default=float))
    for name, image in feedback_figures(table, min_sensitivity, summary.get("auc_floor")).items():
        image.save(output / f"{name}.png")
    both = load("compare_with_estimate", "estimated_vs_realised")
    both.to_csv(output / "estimated_vs_realised.csv", index=False)
    for name, image in load("compare_with_estimate", "estimated_plots").images.items():
        image.save(output / f"{name}.png")
    exported, without_image = feedback.export_sources(rows, summary["key"]) if len(rows) else ({}, 0)
    sources = []
    if exported:
        (output / "sources").mkdir(exist_ok=True)
    for number, (uri, labels) in enumerate(exported.items(), 1):
        path = output / "sources" / f"{number}.csv"
        labels.to_csv(path, index=False)
        site = summary["site"] or "feedback"
        sources.append({"site": f"{site}-{number}", "uri": uri, "labels": str(path.resolve())})
    if sources:
        (output / "sources.yaml").write_text(yaml.safe_dump({"data": {"sources": sources}}, sort_keys=False))
    return {k: v for k, v in summary.items() if k != "test_auc"} | {
        "output": str(output),
        "exported_sources": len(sources),
        "labelled_without_stored_image": without_image,
        "estimated_reliable": int((both["verdict"] == RELIABLE).sum()) if len(both) else 0,
    }
