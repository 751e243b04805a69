"""Site evaluation: a registered version + a labelled site -> metrics with CIs, in MLflow, the version's tags and
card; its launch and its summary."""

from zenml import pipeline
from zenml.enums import ExecutionMode

from pipelines import launch
from steps.site import evaluate_on_site, load_labelled_site
from steps.tracking import mark_run_failed
from steps.version import resolve_model_version
from xray.data.sites import site_name
from xray.requests import EvaluationRequest


@pipeline(name="chest_xray_evaluation", execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def evaluation_pipeline(request: EvaluationRequest) -> None:
    model_info = resolve_model_version(model_version=request.model_version, registry=request.config.registry)
    site_images, site_report = load_labelled_site(request=request)
    evaluate_on_site(model_info, site_images, site_report, request=request)


def run_evaluation(request: EvaluationRequest) -> dict:
    """``evaluate``: one registered version on one labelled site."""
    name = site_name(request.dataset_uri, request.site)
    experiment = request.config.evaluate.site_experiment_name
    return launch.launch(evaluation_pipeline, request, experiment, lambda run, load: summarize(load, name))


def summarize(load, site: str) -> dict:
    """The summary line: the site's metrics at the version's operating point (and re-fitted, with a fraction)."""
    result = load("evaluate_on_site", "site_evaluation").summary
    info = load("resolve_model_version", "model_info")
    metrics = result["metrics"]
    summary = {
        "site": site,
        "model_version": info.version,
        "model_uri": info.uri,
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
