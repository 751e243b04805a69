"""Wiring only: registered version + images -> predictions with out-of-distribution checks (+ Grad-CAM)."""

from zenml import pipeline
from zenml.enums import ExecutionMode

from steps.predict import batch_predict, explain_predictions, load_images, resolve_model_version
from steps.tracking import mark_run_failed
from xray.config import RegistryConfig


@pipeline(name="chest_xray_inference", execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def inference_pipeline(
    images: str, model_version: str, registry: RegistryConfig, explain: int = 0, s3_max_attempts: int = 5
) -> None:
    model_info = resolve_model_version(model_version=model_version, registry=registry)
    screened = load_images(images=images, s3_max_attempts=s3_max_attempts)
    batch_predict(model_info, screened, source=images, registry=registry)
    if explain:
        explain_predictions(model_info, screened, explain=explain, registry=registry)
