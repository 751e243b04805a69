from typing import Annotated

import keras
import mlflow
from mlflow.tracking import MlflowClient
from zenml import log_metadata, step

from steps.caching import DOMAIN_CODE
from steps.tracking import log_config, mlflow_run
from xray import CLASS_NAMES, model_card
from xray import registry as xregistry
from xray.config import EvaluateConfig, ModelConfig, RegistryConfig
from xray.data import DatasetSpec
from xray.ood import ReferenceProfile


@step(cache_policy=DOMAIN_CODE)
def register_model(
    model: keras.Model, metrics: dict, threshold: float, spec: DatasetSpec, archive_info: dict, data_report: dict,
    history: dict, reference_profile: ReferenceProfile, model_config: ModelConfig, registry: RegistryConfig,
    evaluate: EvaluateConfig,
) -> Annotated[dict, "registration"]:
    """Register a new MLflow model version with its card; promote it to champion only through the gate."""
    flat = metrics["flat"]
    metadata = {
        "threshold": threshold, "threshold_policy": metrics["threshold_policy"], "image_size": spec.image_size,
        "preprocessing": spec.preprocessing, "input": "float32 RGB in [0, 255], shape (N, image_size, image_size, 3)",
        "classes": list(CLASS_NAMES), "positive_class": CLASS_NAMES[1], "dataset_sha256": archive_info["sha256"],
        "ood_threshold": reference_profile.threshold, "val_ood_fraction": reference_profile.val_ood_fraction,
    }
    with mlflow_run(registry) as run:
        log_config(registry=registry)
        card = model_card.render(registry.model_name, metrics, spec.counts, data_report, {
            "mlflow_run_id": run.info.run_id, "backbone": model_config.backbone, "weights": model_config.weights,
            "image_size": spec.image_size, "preprocessing": spec.preprocessing,
            "epochs_run": history["throughput"]["epochs_run"], "class_weights": spec.class_weights,
            "dataset_sha256": archive_info["sha256"]}, reference_profile)
        model_uri, version = xregistry.log_and_register(model, registry.model_name, metadata, card, reference_profile)
        mlflow.log_text(card, "model_card.md")
        client = MlflowClient()
        for key, value in metadata.items():
            client.set_model_version_tag(registry.model_name, version, key, str(value))
        decision = xregistry.promote(client, registry.model_name, version, registry.champion_alias, flat,
                                     evaluate.min_sensitivity)
        mlflow.set_tags({"model_version": version, "promotion_decision": "promoted" if decision.promoted else "rejected",
                         "promotion_reason": decision.reason})
    print(f"registered {registry.model_name} v{version}: "
          f"{'promoted to ' + registry.champion_alias if decision.promoted else 'not promoted'} ({decision.reason})", flush=True)
    registration = {"model_name": registry.model_name, "model_version": version, "model_uri": model_uri,
                    "mlflow_run_id": run.info.run_id, "promoted": decision.promoted, "reason": decision.reason,
                    "threshold": threshold}
    log_metadata(metadata={"mlflow_model_version": version, "mlflow_model_uri": model_uri, "promoted": decision.promoted,
                           "test_auc": flat["test_auc"], "test_sensitivity": flat["test_sensitivity"]}, infer_model=True)
    return registration
