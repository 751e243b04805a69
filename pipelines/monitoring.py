"""Wiring only: registered version + a batch of images -> per-image out-of-distribution checks and a drift report."""

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
