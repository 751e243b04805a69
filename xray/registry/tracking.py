"""MLflow tracking helpers: the local store's URI, experiments with their artifacts beside it, per-epoch logging.

Which MLflow run a step logs to is the ZenML stack's business (its MLflow experiment tracker opens one run per
pipeline run); this module only names the local default store the local stack's tracker points at.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from xray.environment import REPO_ROOT

DEFAULT_STORE = REPO_ROOT / ".mlflow"


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
    """The experiment's id, created if missing (for a SQLite store, with its artifacts beside the database)."""
    parsed = urlparse(client.tracking_uri)
    if parsed.scheme == "sqlite":
        Path(parsed.path).parent.mkdir(parents=True, exist_ok=True)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))


def epoch_logger():
    """Keras callback: every epoch's train and val metrics to the active MLflow run."""
    import keras  # lazy: Keras imports TensorFlow, seconds
    import mlflow  # lazy: MLflow's import takes seconds

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics({f"epoch_{k}": float(v) for k, v in (logs or {}).items()}, step=epoch + 1)

    return EpochLogger()
