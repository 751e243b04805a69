"""MLflow tracking: one MLflow run per pipeline run, shared by every step.

Steps may run on different machines (the train step on a SageMaker GPU), so
they find the shared run by a tag holding the orchestrator's run id rather
than by anything held in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

RUN_KEY_TAG = "zenml_pipeline_run_id"
DEFAULT_STORE = Path(__file__).resolve().parents[1] / ".mlflow"


def tracking_uri(configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI, else the config, else a SQLite store under ./.mlflow."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def artifact_location(uri: str) -> str | None:
    """Keep artifacts beside a local SQLite store, not in whatever directory we run from."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return (Path(parsed.path).parent / "artifacts").resolve().as_uri()
    return None


def experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))


def shared_run_id(uri: str, experiment: str, run_key: str, run_name: str) -> str:
    """The MLflow run of this pipeline run, created by whichever step asks first."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    if urlparse(uri).scheme == "sqlite":
        Path(urlparse(uri).path).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, experiment)
    runs = client.search_runs([exp_id], filter_string=f"tags.{RUN_KEY_TAG} = '{run_key}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(exp_id, tags={RUN_KEY_TAG: run_key, MLFLOW_RUN_NAME: run_name})
    return run.info.run_id


def epoch_logger():
    """Keras callback: every epoch's train and val metrics to the active MLflow run."""
    import keras
    import mlflow

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics({f"epoch_{k}": float(v) for k, v in (logs or {}).items()}, step=epoch + 1)

    return EpochLogger()
