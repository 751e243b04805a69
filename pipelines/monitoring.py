"""Wiring only: registered version + a batch of images -> per-image out-of-distribution checks and a drift report."""

import json
from pathlib import Path

from zenml import pipeline
from zenml.enums import ExecutionMode

from steps.monitor import check_drift
from steps.predict import resolve_model_version, score_batch
from steps.tracking import mark_run_failed
from xray.config import ArchiveLimits, InferenceConfig, MonitoringConfig, RegistryConfig


@pipeline(name="chest_xray_monitoring", execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def monitoring_pipeline(
    images: str,
    model_version: str,
    registry: RegistryConfig,
    monitoring: MonitoringConfig,
    inference: InferenceConfig,
    limits: ArchiveLimits,
    seed: int = 42,
    s3_max_attempts: int = 5,
) -> None:
    model_info = resolve_model_version(model_version=model_version, registry=registry)
    predictions, features, examples = score_batch(
        model_info,
        images=images,
        inference=inference,
        registry=registry,
        limits=limits,
        s3_max_attempts=s3_max_attempts,
    )
    check_drift(
        predictions, features, examples, model_info, source=images, monitoring=monitoring, registry=registry, seed=seed
    )


def summarize(load, output: Path) -> dict:
    """The summary line; report.html, report.json, the plots and predictions.csv are written to ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    report = load("check_drift", "drift_report")
    load("score_batch", "predictions").to_csv(output / "predictions.csv", index=False)
    (output / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (output / "report.html").write_text(load("check_drift", "report_html"))
    for name, image in load("check_drift", "monitoring_plots").items():
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
