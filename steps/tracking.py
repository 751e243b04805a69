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



def mark_run_failed(exception: BaseException) -> None:
    """on_failure hook of every pipeline: the pipeline run's MLflow run ends FAILED, with the failed step and the
    error's first line as tags, so the MLflow UI tells a failed run from a finished one."""
    import logging

    from mlflow.tracking import MlflowClient

    context = get_step_context()
    registry = context.step_run.config.parameters.get("registry")
    configured = registry.get("tracking_uri") if isinstance(registry, dict) else getattr(registry, "tracking_uri", None)
    client = MlflowClient(tracking_uri=tracking.tracking_uri(configured))
    run_key = str(context.pipeline_run.id)
    message = (str(exception).splitlines() or [type(exception).__name__])[0][:500]
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"tags.{tracking.RUN_KEY_TAG} = '{run_key}'") if experiments else []
        for run in runs:
            client.set_tag(run.info.run_id, "error", f"{type(exception).__name__}: {message}")
            client.set_tag(run.info.run_id, "failed_step", context.step_run.name)
            client.set_terminated(run.info.run_id, status="FAILED")
    except Exception as error:  # noqa: BLE001 - the step's own error is what the user must see; say this one too
        logging.getLogger(__name__).warning("could not mark the MLflow run of %s FAILED: %s", run_key, error)
