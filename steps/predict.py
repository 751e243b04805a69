"""Steps of the batch inference pipeline: registered model + images in, predictions and Grad-CAM out."""

import tempfile
from pathlib import Path
from typing import Annotated, Tuple

import keras
import mlflow
import pandas as pd
from PIL import Image
from zenml import step

from materializers import KerasModelMaterializer, ValidatedDatasetMaterializer
from steps.tracking import mlflow_run
from xray import gradcam, inference
from xray import registry as xregistry
from xray import tracking
from xray.config import RegistryConfig
from xray.data import make_spec_for_inference
from xray.dataset import ValidatedDataset
from xray.predict import predict_paths


# Not cached: an alias such as champion can move between runs.
@step(enable_cache=False, output_materializers={"model": KerasModelMaterializer})
def load_registered_model(model_version: str, registry: RegistryConfig) -> Tuple[
    Annotated[keras.Model, "model"], Annotated[dict, "model_info"]
]:
    """The Keras model and its recorded threshold, image size and preprocessing."""
    mlflow.set_tracking_uri(tracking.tracking_uri(registry.tracking_uri))
    model, info = xregistry.load_version(registry.model_name, model_version)
    print(f"loaded {registry.model_name} v{info['version']} ({info['uri']}): threshold {info['threshold']:.4f}, "
          f"{info['image_size']} px", flush=True)
    return model, info


@step(enable_cache=False, output_materializers={"images": ValidatedDatasetMaterializer})
def load_images(images: str, s3_max_attempts: int = 5) -> Annotated[ValidatedDataset, "images"]:
    """JPEG/PNG from a folder, a zip or an S3 prefix; unreadable ones are kept as rows with a status."""
    screened = inference.screen(inference.gather(images, s3_max_attempts), Path(tempfile.mkdtemp(prefix="xray-infer-")))
    bad = int((screened.manifest["status"] != "ok").sum())
    print(f"{len(screened.manifest)} images from {images}; {bad} unreadable", flush=True)
    return screened


@step
def batch_predict(model: keras.Model, model_info: dict, images: ValidatedDataset, source: str,
                  registry: RegistryConfig) -> Annotated[pd.DataFrame, "predictions"]:
    """Batched tf.data prediction with the recorded preprocessing and threshold."""
    readable = images.manifest[images.manifest["status"] == "ok"]
    spec = make_spec_for_inference(model_info["image_size"])
    probabilities = predict_paths(model, images.paths(readable), spec)
    table = inference.predictions_table(images, probabilities, model_info["threshold"], model_info["version"])
    with mlflow_run(registry):
        mlflow.log_params({"model_uri": model_info["uri"], "model_version": model_info["version"], "images": source,
                           "threshold": model_info["threshold"], "image_size": model_info["image_size"]})
        mlflow.log_metrics({"images": len(table), "unreadable": int((table["status"] != "ok").sum()),
                            "predicted_pneumonia": int((table["label"] == "PNEUMONIA").sum())})
        mlflow.log_text(table.to_csv(index=False), "predictions.csv")
    return table


@step
def explain_predictions(model: keras.Model, model_info: dict, images: ValidatedDataset, explain: int,
                        registry: RegistryConfig) -> Annotated[dict, "gradcam"]:
    """Grad-CAM overlays (last conv block of the backbone) for the first ``explain`` readable images."""
    rows = images.manifest[images.manifest["status"] == "ok"].head(explain)
    if rows.empty:
        return {}
    pictures = gradcam.overlays_for(model, images.paths(rows), model_info["image_size"], model_info["threshold"])
    overlays: dict[str, Image.Image] = {
        f"gradcam_{Path(source.split('!')[-1]).stem}.png": picture for source, picture in zip(rows["source"], pictures)}
    with mlflow_run(registry):
        for name, overlay in overlays.items():
            mlflow.log_image(overlay, f"gradcam/{name}")
    return overlays
