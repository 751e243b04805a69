"""Wiring only: registered version + a batch of images -> per-image out-of-distribution checks and a drift report."""

from zenml import pipeline
from zenml.enums import ExecutionMode

from steps.monitor import check_drift
from steps.predict import batch_predict, load_images, resolve_model_version
from steps.tracking import mark_run_failed
from xray.config import MonitoringConfig, RegistryConfig


@pipeline(name="chest_xray_monitoring", execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def monitoring_pipeline(
    images: str,
    model_version: str,
    registry: RegistryConfig,
    monitoring: MonitoringConfig,
    seed: int = 42,
    s3_max_attempts: int = 5,
) -> None:
    model_info = resolve_model_version(model_version=model_version, registry=registry)
    screened = load_images(images=images, s3_max_attempts=s3_max_attempts)
    predictions, features = batch_predict(model_info, screened, source=images, registry=registry)
    check_drift(
        predictions, features, screened, model_info, source=images, monitoring=monitoring, registry=registry, seed=seed
    )
