import logging
from typing import Annotated

import keras
import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from zenml import get_step_context, log_metadata, step

from steps.caching import DOMAIN_CODE
from steps.tracking import log_config, mlflow_run
from xray import CLASS_NAMES, gate, model_card
from xray import data as xdata
from xray import registry as xregistry
from xray.config import DataConfig, EvaluateConfig, ModelConfig, RegistryConfig, S3Config
from xray.dataset import ValidatedDataset
from xray.ood import ReferenceProfile

logger = logging.getLogger(__name__)


@step(cache_policy=DOMAIN_CODE, experiment_tracker=True)
def register_model(
    model: keras.Model,
    metrics: dict,
    threshold: float,
    test_probabilities: np.ndarray,
    dataset: ValidatedDataset,
    spec: xdata.DatasetSpec,
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
) -> Annotated[dict, "registration"]:
    """Register a new MLflow model version with its card; promote it to champion only through the gate."""
    flat = metrics["flat"]
    metadata = {
        "threshold": threshold,
        "threshold_policy": metrics["threshold_policy"],
        "image_size": spec.image_size,
        "preprocessing": spec.preprocessing,
        "input": "float32 RGB in [0, 255], shape (N, image_size, image_size, 3)",
        "classes": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[1],
        "dataset_sha256": archive_info["sha256"],
        "ood_threshold": reference_profile.threshold,
        "val_ood_fraction": reference_profile.val_ood_fraction,
        "calibration": metrics.get("calibration", {}).get("method", "none"),
    }
    client = MlflowClient()  # the stack's tracking server: its experiment tracker set the URI
    champion, _ = xregistry.current_champion(client, registry.model_name, registry.champion_alias)
    paths, labels, challenger = (
        gate.image_sets(model, dataset, spec, test_probabilities, registry.gate_sites, data, s3)
        if champion is not None
        else ({}, {}, {})
    )
    decision = gate.run(
        registry.model_name,
        champion,
        paths,
        labels,
        challenger,
        flat["test_sensitivity"],
        evaluate.min_sensitivity,
        registry.margin,
        evaluate.bootstrap_samples,
        seed,
    )
    with mlflow_run() as run:
        log_config(registry=registry)
        card = model_card.render(
            registry.model_name,
            metrics,
            spec.counts,
            data_report,
            {
                "mlflow_run_id": run.info.run_id,
                "backbone": model_config.backbone,
                "weights": model_config.weights,
                "image_size": spec.image_size,
                "preprocessing": spec.preprocessing,
                "epochs_run": history["throughput"]["epochs_run"],
                "class_weights": spec.class_weights,
                "dataset_sha256": archive_info["sha256"],
            },
            reference_profile,
            gate.markdown(decision, evaluate.min_sensitivity),
        )
        model_uri, version = xregistry.log_and_register(model, registry.model_name, metadata, card, reference_profile)
        mlflow.log_text(card, "model_card.md")
        for key, value in metadata.items():
            client.set_model_version_tag(registry.model_name, version, key, str(value))
        decision = xregistry.promote(client, registry.model_name, version, registry.champion_alias, flat, decision)
        mlflow.set_tags(
            {
                "model_version": version,
                "promotion_decision": "promoted" if decision.promoted else "rejected",
                "promotion_reason": decision.reason[:4900],
            }
        )
        for name, comparison in decision.comparisons.items():
            mlflow.log_metrics(
                {
                    f"gate_{name.replace(':', '_')}_{key}": value
                    for key, value in comparison.items()
                    if isinstance(value, float)
                }
            )
    if decision.promoted:
        # One source of truth: the MLflow alias (read by batch inference, serving and the gate). The ZenML Model
        # version of this run follows it, so the dashboard's "production" is the same version.
        get_step_context().model.set_stage("production", force=True)
    logger.info(
        "registered %s v%s: %s (%s)",
        registry.model_name,
        version,
        f"promoted to {registry.champion_alias}" if decision.promoted else "not promoted",
        decision.reason,
    )
    registration = {
        "model_name": registry.model_name,
        "model_version": version,
        "model_uri": model_uri,
        "mlflow_run_id": run.info.run_id,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "threshold": threshold,
        "gate": decision.comparisons,
        "previous_champion": champion,
    }
    log_metadata(
        metadata={
            "mlflow_model_version": version,
            "mlflow_model_uri": model_uri,
            "promoted": decision.promoted,
            "test_auc": flat["test_auc"],
            "test_sensitivity": flat["test_sensitivity"],
        },
        infer_model=True,
    )
    return registration
