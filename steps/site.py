"""Steps of the evaluation pipeline: a registered version measured on a labelled site."""

import json
import logging
from typing import Annotated, Optional, Tuple

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from requests import HTTPError
from zenml import step

from materializers import ValidatedDatasetMaterializer
from steps.scratch import output_folder
from steps.tracking import log_config, log_images, mlflow_run
from xray.config import DataConfig, EvaluateConfig, RegistryConfig, S3Config
from xray.data import sites
from xray.data.dataset import ValidatedDataset
from xray.evaluation import plots
from xray.evaluation.recipes import evaluate_site
from xray.registry import card, store, tracking

logger = logging.getLogger(__name__)
MANAGE_NEEDED = "changing a sealed version needs MANAGE on the model, which this run's MLflow account lacks"


def _store_or_propose(client, model_name: str, version: str, site: str, point: dict) -> str:
    """Store the site's operating point with the version (it answers differently from then on), or, where the run's
    account may not change a sealed version, leave it proposed in the site's tag for a reviewer to apply."""
    try:
        store.save_operating_point(client, model_name, version, site, point)
    except (MlflowException, HTTPError) as error:
        if tracking.refusal(error) is None:
            raise
        return (
            f"proposed, not stored ({MANAGE_NEEDED}); a reviewer applies it: python3 run.py approve --model-version "
            f"{version} --operating-point {site}:{card.proposal_id(point)} --reason TEXT"
        )
    return f"stored: --site {site} now uses it in batch inference and serving"


@step(enable_cache=False, output_materializers={"site_images": ValidatedDatasetMaterializer}, experiment_tracker=True)
def load_labelled_site(
    dataset_uri: str, data: DataConfig, s3: S3Config
) -> Tuple[Annotated[ValidatedDataset, "site_images"], Annotated[dict, "site_report"]]:
    """NORMAL/ and PNEUMONIA/ folders at any depth of a zip or folder, through the training archive's checks."""
    dataset, report = sites.load_site(dataset_uri, output_folder("site_images"), data, s3)
    logger.info(
        "site %s: %d images %s; %d quarantined, %d duplicates removed, %d files outside NORMAL/ PNEUMONIA/",
        dataset_uri,
        report["images"],
        report["counts"],
        len(report["quarantined"]),
        report["duplicates_removed"],
        report["ignored_files"],
    )
    return dataset, report


@step(enable_cache=False, experiment_tracker=True)
def evaluate_on_site(
    model_info: dict,
    site_images: ValidatedDataset,
    site_report: dict,
    site: str,
    recalibrate_fraction: Optional[float],
    evaluate: EvaluateConfig,
    registry: RegistryConfig,
    seed: int,
) -> Tuple[Annotated[dict, "site_evaluation"], Annotated[Image.Image, "site_reliability"]]:
    """Metrics with CIs at the version's threshold (and re-fitted on a share of the site); MLflow run linked to the
    version; the version's tags and model card gain the site's row."""
    predictor, _ = store.load_predictor(registry.model_name, model_info["version"])
    result = evaluate_site(predictor, site_images, evaluate, recalibrate_fraction, seed)
    metrics = result["metrics"]
    figure = plots.calibration(
        result["y"],
        {f"v{model_info['version']} as registered": result["probabilities"]},
        title=f"Reliability on site {site}",
    )
    client = MlflowClient()
    model_id = store.logged_model_id(client.get_model_version(registry.model_name, model_info["version"]))
    with mlflow_run() as run:
        log_config(evaluate=evaluate)
        mlflow.set_tags(
            {
                "site": site,
                "model_name": registry.model_name,
                "model_version": model_info["version"],
                "model_uri": model_info["uri"],
                "dataset_uri": site_report["source_uri"],
            }
        )
        mlflow.log_params({"site": site, "recalibrate_fraction": recalibrate_fraction})
        # model_id links the run's metrics to the registered version's logged model (its page in the MLflow UI).
        mlflow.log_metrics({f"site_{k}": v for k, v in metrics.items()}, model_id=model_id)
        if "recalibrated" in result:
            mlflow.log_metrics(
                {f"site_recalibrated_{k}": v for k, v in result["recalibrated"]["metrics"].items()}, model_id=model_id
            )
        summary = {k: v for k, v in result.items() if k not in ("y", "probabilities")}
        mlflow.log_text(
            json.dumps(summary | {"site_report": site_report}, indent=1, default=str), "evaluation/site_report.json"
        )
        log_images({"site_reliability": figure}, "evaluation")
    recalibrated = result.get("recalibrated")
    if recalibrated is not None and recalibrated["meets_policy"]:
        recalibrated["operating_point"] = {
            "calibration": recalibrated["calibration"],
            "threshold": recalibrated["metrics"]["threshold"],
            "threshold_policy": recalibrated["threshold_policy"],
            "fitted_on": f"{recalibrated['calibration_images']} images of the site (--recalibrate-fraction "
            f"{recalibrated['fraction']:g}, run {run.info.run_id})",
        }
    version = model_info["version"]
    store.record_site_result(client, registry.model_name, version, site, metrics, run.info.run_id, recalibrated)
    if recalibrated is not None:
        summary["operating_point"] = (
            _store_or_propose(client, registry.model_name, version, site, recalibrated["operating_point"])
            if recalibrated["meets_policy"]
            else "not stored: " + recalibrated["policy"]
        )
        logger.info("site %s operating point %s", site, summary["operating_point"])
    try:
        store.update_model_card(client, registry.model_name, version)
    except (MlflowException, HTTPError) as error:
        if tracking.refusal(error) is None:
            raise
        summary["model_card"] = f"not updated ({MANAGE_NEEDED}): the site's row is in the tag site.{site}"
        logger.warning("v%s's model card %s", version, summary["model_card"])
    logger.info(
        "v%s on site %s: AUC %.3f (%.3f-%.3f), sensitivity %.3f, specificity %.3f at threshold %.4f",
        model_info["version"],
        site,
        metrics["auc"],
        metrics["auc_ci_low"],
        metrics["auc_ci_high"],
        metrics["sensitivity"],
        metrics["specificity"],
        metrics["threshold"],
    )
    return summary | {"mlflow_run_id": run.info.run_id}, figure
