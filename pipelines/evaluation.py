"""Wiring only: a registered version + a labelled site -> metrics with CIs, in MLflow and the version's card."""

from typing import Optional

from zenml import pipeline
from zenml.enums import ExecutionMode

from steps.predict import resolve_model_version
from steps.site import evaluate_on_site, load_labelled_site
from steps.tracking import mark_run_failed
from xray.config import DataConfig, EvaluateConfig, RegistryConfig, S3Config


@pipeline(name="chest_xray_evaluation", execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def evaluation_pipeline(
    dataset_uri: str,
    site: str,
    model_version: str,
    recalibrate_fraction: Optional[float],
    data: DataConfig,
    s3: S3Config,
    evaluate: EvaluateConfig,
    registry: RegistryConfig,
    seed: int = 42,
) -> None:
    model_info = resolve_model_version(model_version=model_version, registry=registry)
    site_images, site_report = load_labelled_site(dataset_uri=dataset_uri, data=data, s3=s3)
    evaluate_on_site(
        model_info,
        site_images,
        site_report,
        site=site,
        recalibrate_fraction=recalibrate_fraction,
        evaluate=evaluate,
        registry=registry,
        seed=seed,
    )


def summarize(load, site: str) -> dict:
    """The summary line: the site's metrics at the version's operating point (and re-fitted, with a fraction)."""
    result = load("evaluate_on_site", "site_evaluation")
    info = load("resolve_model_version", "model_info")
    metrics = result["metrics"]
    summary = {
        "site": site,
        "model_version": info["version"],
        "model_uri": info["uri"],
        "images": metrics["images"],
        "threshold": metrics["threshold"],
        "metrics": {k: v for k, v in metrics.items() if k not in ("images", "threshold")},
        "mlflow_run_id": result["mlflow_run_id"],
    }
    if "model_card" in result:  # not updated: the run's account may not change the sealed version
        summary["model_card"] = result["model_card"]
    if "recalibrated" in result:
        recalibrated = result["recalibrated"]
        summary["recalibrated"] = {
            k: recalibrated[k]
            for k in ("fraction", "calibration_images", "measured_images", "calibration", "meets_policy", "policy")
        } | {
            "threshold": recalibrated["metrics"]["threshold"],
            "metrics": {k: v for k, v in recalibrated["metrics"].items() if k not in ("images", "threshold")},
            "operating_point": result.get("operating_point", ""),
        }
    return summary
