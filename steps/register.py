import logging
from typing import Annotated

import keras
import numpy as np
from mlflow.tracking import MlflowClient
from zenml import get_step_context, log_metadata, step

from steps.caching import DOMAIN_CODE
from steps.tracking import log_config, mlflow_run
from xray.config import DataConfig, EvaluateConfig, ModelConfig, RegistryConfig, S3Config, ScopeConfig
from xray.data import inputs
from xray.data.dataset import ValidatedDataset
from xray.monitoring.ood import ReferenceProfile
from xray.registry import promotion

logger = logging.getLogger(__name__)


@step(cache_policy=DOMAIN_CODE, experiment_tracker=True)
def register_model(
    model: keras.Model,
    metrics: dict,
    threshold: float,
    test_probabilities: np.ndarray,
    dataset: ValidatedDataset,
    spec: inputs.DatasetSpec,
    archive_info: dict,
    data_report: dict,
    history: dict,
    reference_profile: ReferenceProfile,
    model_config: ModelConfig,
    registry: RegistryConfig,
    evaluate: EvaluateConfig,
    data: DataConfig,
    s3: S3Config,
    seed: int,
    scope: ScopeConfig = ScopeConfig(),
) -> Annotated[dict, "registration"]:
    """Register a new MLflow model version with its card; promote it to champion only through the gate
    (xray.registry.promotion.register_candidate)."""
    with mlflow_run():
        log_config(registry=registry)
        registration = promotion.register_candidate(
            MlflowClient(),  # the stack's tracking server: its experiment tracker set the URI
            model,
            metrics=metrics,
            threshold=threshold,
            test_probabilities=test_probabilities,
            dataset=dataset,
            spec=spec,
            dataset_sha256=archive_info["sha256"],
            data_report=data_report,
            training={
                "backbone": model_config.backbone,
                "weights": model_config.weights,
                "epochs_run": history["throughput"]["epochs_run"],
            },
            reference_profile=reference_profile,
            registry=registry,
            evaluate=evaluate,
            data=data,
            s3=s3,
            seed=seed,
            scope=scope,
        )
    zenml_model = get_step_context().model
    MlflowClient().set_model_version_tag(
        registry.model_name, registration["model_version"], "zenml.model_version_id", str(zenml_model.id)
    )
    if registration.get("pending_approval"):
        zenml_model.set_stage("staging", force=True)
        logger.info("ZenML Model version of this run: stage staging (pending approval in MLflow)")
    if registration["promoted"]:
        # One source of truth: the MLflow alias (read by batch inference, serving and the gate). The ZenML Model
        # version of this run follows it, so the dashboard's "production" is the same version.
        zenml_model.set_stage("production", force=True)
        logger.info("ZenML Model version of this run: stage production (follows the MLflow alias)")
    flat = metrics["flat"]
    log_metadata(
        metadata={
            "mlflow_model_version": registration["model_version"],
            "mlflow_model_uri": registration["model_uri"],
            "promoted": registration["promoted"],
            "test_auc": flat["test_auc"],
            "test_sensitivity": flat["test_sensitivity"],
        },
        infer_model=True,
    )
    return registration
