"""Steps of the batch inference and monitoring pipelines: a registered version + images in, predictions out.

Nothing large passes through the artifact store: the model is loaded from the MLflow registry by its pinned version
(recorded as metadata), images are streamed from their source, and batch inference writes its predictions to the
output it was given; only a summary is stored. Monitoring keeps its batch's table and features for the drift test.
"""

import logging
import tempfile
from pathlib import Path
from typing import Annotated, Tuple

import mlflow
import pandas as pd
from PIL import Image
from zenml import log_metadata, step

from steps.tracking import log_config, mlflow_run
from xray.config import ArchiveLimits, InferenceConfig, RegistryConfig
from xray.model import gradcam
from xray.monitoring import ood
from xray.registry import store
from xray.serving import batch
from xray.storage import listing

logger = logging.getLogger(__name__)


# Not cached: an alias such as champion can move between runs.
@step(enable_cache=False, experiment_tracker=True)
def resolve_model_version(model_version: str, registry: RegistryConfig) -> Annotated[dict, "model_info"]:
    """Pin an alias such as champion to its version number, so every step of this run uses the same version."""
    info = store.resolve_version(registry.model_name, model_version)
    logger.info("using %s (%s)", info["uri"], model_version)
    return info


def _load(model_info: dict, registry: RegistryConfig):
    predictor, _ = store.load_predictor(registry.model_name, model_info["version"])
    log_metadata(metadata={"model_uri": model_info["uri"], "model_version": model_info["version"]})
    return predictor


@step(enable_cache=False, experiment_tracker=True)
def predict_batch(
    model_info: dict,
    images: str,
    output: str,
    resume: bool,
    inference: InferenceConfig,
    registry: RegistryConfig,
    limits: ArchiveLimits = ArchiveLimits(),
    s3_max_attempts: int = 5,
) -> Annotated[dict, "prediction_summary"]:
    """Stream every image of ``images`` through the version and write one row per image to ``output``."""
    predictor = _load(model_info, registry)
    with batch.PredictionWriter(output, resume, s3_max_attempts) as writer:
        result = batch.predict_source(predictor, images, inference, writer, limits=limits, max_attempts=s3_max_attempts)
    summary = result.summary() | {"output": output, "rows_written": writer.rows}
    logger.info("predicted %s: %s", images, summary)
    with mlflow_run():
        log_config(inference=inference)
        mlflow.log_params(
            {
                "model_uri": model_info["uri"],
                "model_version": model_info["version"],
                "images": images,
                "output": output,
                "resume": resume,
                "threshold": model_info["threshold"],
                "image_size": model_info["image_size"],
            }
        )
        mlflow.log_metrics(
            {key: value for key, value in summary.items() if isinstance(value, (int, float)) and value is not None}
            | {f"predicted_{label.lower()}": count for label, count in result.predicted.items()}
        )
    return summary


@step(enable_cache=False, experiment_tracker=True)
def score_batch(
    model_info: dict,
    images: str,
    inference: InferenceConfig,
    registry: RegistryConfig,
    limits: ArchiveLimits = ArchiveLimits(),
    s3_max_attempts: int = 5,
) -> Tuple[
    Annotated[pd.DataFrame, "predictions"],
    Annotated[pd.DataFrame, "image_features"],
    Annotated[dict, "ood_examples"],
]:
    """Monitoring: the batch's predictions, out-of-distribution features and its most unusual images."""
    predictor = _load(model_info, registry)
    result = batch.predict_source(
        predictor, images, inference, limits=limits, max_attempts=s3_max_attempts, keep=True, examples=8
    )
    logger.info("scored %s: %s", images, result.summary())
    examples = {name: picture for _, name, picture in result.examples}
    return result.table, ood.feature_table(result.features, predictor.profile), examples


@step(enable_cache=False, experiment_tracker=True)
def explain_predictions(
    model_info: dict,
    images: str,
    explain: int,
    registry: RegistryConfig,
    limits: ArchiveLimits = ArchiveLimits(),
    s3_max_attempts: int = 5,
) -> Annotated[dict, "gradcam"]:
    """Grad-CAM overlays (last conv block of the backbone) for the first ``explain`` readable images."""
    found = batch.first_readable(listing.list_images(images, limits, max_attempts=s3_max_attempts), explain)
    if not found:
        return {}
    predictor = _load(model_info, registry)
    with tempfile.TemporaryDirectory(prefix="xray-explain-") as folder:
        paths = []
        for index, (_, data) in enumerate(found):
            paths.append(str(Path(folder, f"{index:04d}")))
            Path(paths[-1]).write_bytes(data)
        pictures = gradcam.overlays_for(predictor.model, paths, predictor.image_size, predictor.threshold)
    overlays: dict[str, Image.Image] = {
        f"gradcam_{Path(name.split('!')[-1]).stem}.png": picture for (name, _), picture in zip(found, pictures)
    }
    with mlflow_run():
        for name, overlay in overlays.items():
            mlflow.log_image(overlay, f"gradcam/{name}")
    return overlays
