"""Steps of the evaluation pipeline: a registered version measured on a labelled site."""

import json
import logging
from typing import Annotated, Tuple

import mlflow
from mlflow.tracking import MlflowClient
from PIL import Image
from zenml import step

from materializers import ValidatedDatasetMaterializer
from steps.records import SiteEvaluation
from steps.scratch import output_folder
from steps.tracking import log_config, log_images, mlflow_run
from steps.version import load
from xray.data import sites
from xray.data.dataset import ValidatedDataset
from xray.evaluation import plots
from xray.evaluation.recipes import evaluate_site
from xray.registry import decisions, store
from xray.requests import EvaluationRequest

logger = logging.getLogger(__name__)


@step(enable_cache=False, output_materializers={"site_images": ValidatedDatasetMaterializer}, experiment_tracker=True)
def load_labelled_site(
    request: EvaluationRequest,
) -> Tuple[Annotated[ValidatedDataset, "site_images"], Annotated[SiteEvaluation, "site_report"]]:
    """NORMAL/ and PNEUMONIA/ folders at any depth of a zip or folder, through the training archive's checks."""
    config = request.config
    dataset, report = sites.load_site(request.dataset_uri, output_folder("site_images"), config.data, config.s3)
    logger.info(
        "site %s: %d images %s; %d quarantined, %d duplicates removed, %d files outside NORMAL/ PNEUMONIA/",
        request.dataset_uri,
        report["images"],
        report["counts"],
        len(report["quarantined"]),
        report["duplicates_removed"],
        report["ignored_files"],
    )
    return dataset, SiteEvaluation(report)


@step(enable_cache=False, experiment_tracker=True)
def evaluate_on_site(
    model_info: store.ModelInfo, site_images: ValidatedDataset, site_report: SiteEvaluation, request: EvaluationRequest
) -> Tuple[Annotated[SiteEvaluation, "site_evaluation"], Annotated[Image.Image, "site_reliability"]]:
    """Metrics with CIs at the version's threshold (and re-fitted on a share of the site); MLflow run linked to the
    version; the version's tags, card and operating points gain the site's (xray.registry.decisions)."""
    config, site, version = request.config, sites.site_name(request.dataset_uri, request.site), model_info.version
    predictor = load(model_info, config.registry.model_name)
    result = evaluate_site(predictor, site_images, config.evaluate, request.recalibrate_fraction, config.seed)
    metrics = result["metrics"]
    figure = plots.calibration(
        result["y"], {f"v{version} as registered": result["probabilities"]}, title=f"Reliability on site {site}"
    )
    client = MlflowClient()
    model_id = store.logged_model_id(client.get_model_version(config.registry.model_name, version))
    summary = {k: v for k, v in result.items() if k not in ("y", "probabilities")}
    with mlflow_run() as run:
        log_config(evaluate=config.evaluate)
        mlflow.set_tags({"site": site, "model_name": config.registry.model_name, "model_version": version})
        mlflow.set_tags({"model_uri": model_info.uri, "dataset_uri": site_report.summary["source_uri"]})
        mlflow.log_params({"site": site, "recalibrate_fraction": request.recalibrate_fraction})
        # model_id links the run's metrics to the registered version's logged model (its page in the MLflow UI).
        mlflow.log_metrics({f"site_{k}": v for k, v in metrics.items()}, model_id=model_id)
        if "recalibrated" in result:
            refitted = result["recalibrated"]["metrics"]
            mlflow.log_metrics({f"site_recalibrated_{k}": v for k, v in refitted.items()}, model_id=model_id)
        report = json.dumps(summary | {"site_report": site_report.summary}, indent=1, default=str)
        mlflow.log_text(report, "evaluation/site_report.json")
        log_images({"site_reliability": figure}, "evaluation")
    done = decisions.record_site_evaluation(client, config.registry.model_name, version, site, result, run.info.run_id)
    for what, line in done.items():
        logger.info("site %s %s: %s", site, what, line)
    logger.info(
        "v%s on site %s: AUC %.3f (%.3f-%.3f), sensitivity %.3f, specificity %.3f at threshold %.4f",
        version, site, metrics["auc"], metrics["auc_ci_low"], metrics["auc_ci_high"],
        metrics["sensitivity"], metrics["specificity"], metrics["threshold"],
    )  # fmt: skip
    summary = summary | {"mlflow_run_id": run.info.run_id, **{k: v for k, v in done.items() if k == "model_card"}}
    if "operating_point" in done:
        summary["operating_point"] = done["operating_point"]
    return SiteEvaluation(json.loads(json.dumps(summary, default=str))), figure
