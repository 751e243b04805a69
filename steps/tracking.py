"""The MLflow run shared by every step of one pipeline run."""

from contextlib import contextmanager

import mlflow
from zenml import get_step_context

from xray import tracking
from xray.config import RegistryConfig, flatten


@contextmanager
def mlflow_run(registry: RegistryConfig):
    uri = tracking.tracking_uri(registry.tracking_uri)
    run = get_step_context().pipeline_run
    run_id = tracking.shared_run_id(uri, registry.experiment_name, str(run.id), run.name)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id) as active:
        yield active


def log_images(images: dict, folder: str = "plots") -> None:
    for name, image in images.items():
        mlflow.log_image(image, f"{folder}/{name}.png")


def log_config(**sections) -> None:
    """Params under the config's own dotted names, e.g. ``train.batch_size``."""
    params = {}
    for name, section in sections.items():
        value = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
        params.update(flatten({name: value}))
    mlflow.log_params(params)

