"""Steps of the batch inference and monitoring pipelines: a registered version + images in, predictions out.

The model is never copied into the artifact store: each step loads the version's folder from the MLflow
registry (the folder serving loads), and the pipeline passes only the pinned version between steps.
"""

import logging
import tempfile
from pathlib import Path
from typing import Annotated, Tuple

import mlflow
import pandas as pd
from PIL import Image
from zenml import step

from materializers import ValidatedDatasetMaterializer
from steps.tracking import mlflow_run
from xray import gradcam, inference
from xray import registry as xregistry
from xray.config import RegistryConfig
from xray.dataset import ValidatedDataset
from xray.ood import OUT_OF_DISTRIBUTION, UNREADABLE

logger = logging.getLogger(__name__)


# Not cached: an alias such as champion can move between runs.
@step(enable_cache=False, experiment_tracker=True)
def resolve_model_version(model_version: str, registry: RegistryConfig) -> Annotated[dict, "model_info"]:
    """Pin an alias such as champion to its version number, so every step of this run uses the same version."""
    info = xregistry.resolve_version(registry.model_name, model_version)
    logger.info("using %s (%s)", info["uri"], model_version)
    return info


@step(enable_cache=False, output_materializers={"images": ValidatedDatasetMaterializer}, experiment_tracker=True)
def load_images(images: str, s3_max_attempts: int = 5) -> Annotated[ValidatedDataset, "images"]:
    """JPEG/PNG from a folder, a zip or an S3 prefix; unreadable ones are kept as rows with a status."""
    screened = inference.screen(inference.gather(images, s3_max_attempts), Path(tempfile.mkdtemp(prefix="xray-infer-")))
    bad = int((screened.manifest["status"] != "ok").sum())
    logger.info("%d images from %s; %d unreadable", len(screened.manifest), images, bad)
    return screened


@step(enable_cache=False, experiment_tracker=True)
def batch_predict(
    model_info: dict, images: ValidatedDataset, source: str, registry: RegistryConfig
) -> Tuple[Annotated[pd.DataFrame, "predictions"], Annotated[pd.DataFrame, "image_features"]]:
    """Probabilities at the version's threshold, and whether each image is like the version's training data."""
    predictor, _ = xregistry.load_predictor(registry.model_name, model_info["version"])
    table, features = inference.predict_images(predictor, images)
    counts = {
        "images": len(table),
        "unreadable": int((table["status"] == UNREADABLE).sum()),
        "out_of_distribution": int((table["status"] == OUT_OF_DISTRIBUTION).sum()),
        "predicted_pneumonia": int((table["label"] == "PNEUMONIA").sum()),
    }
    logger.info("predicted %d images: %s", len(table), counts)
    with mlflow_run():
        mlflow.log_params(
            {
                "model_uri": model_info["uri"],
                "model_version": model_info["version"],
                "images": source,
                "threshold": model_info["threshold"],
                "image_size": model_info["image_size"],
            }
        )
        mlflow.log_metrics(counts)
        mlflow.log_text(table.to_csv(index=False), "predictions.csv")
    return table, features


@step(enable_cache=False, experiment_tracker=True)
def explain_predictions(
    model_info: dict, images: ValidatedDataset, explain: int, registry: RegistryConfig
) -> Annotated[dict, "gradcam"]:
    """Grad-CAM overlays (last conv block of the backbone) for the first ``explain`` readable images."""
    rows = images.manifest[images.manifest["status"] == "ok"].head(explain)
    if rows.empty:
        return {}
    predictor, _ = xregistry.load_predictor(registry.model_name, model_info["version"])
    pictures = gradcam.overlays_for(predictor.model, images.paths(rows), predictor.image_size, predictor.threshold)
    overlays: dict[str, Image.Image] = {
        f"gradcam_{Path(source.split('!')[-1]).stem}.png": picture for source, picture in zip(rows["source"], pictures)
    }
    with mlflow_run():
        for name, overlay in overlays.items():
            mlflow.log_image(overlay, f"gradcam/{name}")
    return overlays
