"""MLflow tracking helpers: the local store's URI, experiments with their artifacts beside it, per-epoch logging.

Which MLflow run a step logs to is the ZenML stack's business (its MLflow experiment tracker opens one run per
pipeline run); this module only names the local default store the local stack's tracker points at.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from requests import HTTPError

from xray.environment import REPO_ROOT
from xray.errors import ConfigError

DEFAULT_STORE = REPO_ROOT / ".mlflow"


def tracking_uri(configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI, else the config, else a SQLite store under ./.mlflow."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def authenticated_user(uri: str | None) -> str | None:
    """The MLflow account this process is signed in as (MLFLOW_TRACKING_USERNAME, checked by the server), or None
    when there is no account: no username set, a local store, or a server without MLflow's basic-auth app."""
    username = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not username or not uri or urlparse(uri).scheme not in ("http", "https"):
        return None
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds
    from mlflow.server.auth.client import AuthServiceClient  # lazy: as above

    try:
        return AuthServiceClient(uri).get_user(username).username
    except MlflowException as error:
        if error.error_code == "UNAUTHENTICATED":
            raise ConfigError(
                f"the MLflow server at {uri} refuses the account MLFLOW_TRACKING_USERNAME={username} "
                "(wrong MLFLOW_TRACKING_PASSWORD?)"
            ) from None
        if error.error_code in ("ENDPOINT_NOT_FOUND", "RESOURCE_DOES_NOT_EXIST") or "404" in str(error):
            return None  # a server without accounts: the username means nothing to it
        raise


def may_promote(uri: str | None, model_name: str) -> tuple[str, bool] | None:
    """(the signed-in account, whether it holds MANAGE on the registered model: admin, or a grant on the model's
    name or on every model), or None on a server without accounts. The server's own listing of the account's
    grants; the server still decides every request."""
    user = authenticated_user(uri)
    if user is None or uri is None:
        return None
    from mlflow.utils.credentials import get_default_host_creds  # lazy: MLflow's import takes seconds
    from mlflow.utils.rest_utils import http_request, verify_rest_response  # lazy: as above

    endpoint = "/api/3.0/mlflow/users/current/permissions"  # basic-auth's own route (mlflow.server.auth.routes)
    listing = verify_rest_response(http_request(get_default_host_creds(uri), endpoint, "GET"), endpoint).json()
    manages = listing.get("is_admin", False) or any(
        grant.get("resource_type") == "registered_model"
        and grant.get("resource_pattern") in ("*", model_name)
        and grant.get("permission") == "MANAGE"
        for grant in listing.get("permissions", [])
    )
    return user, bool(manages)


def refusal(error) -> str | None:
    """The server's own sentence when MLflow refused a request for want of permission (HTTP 403: an MLflow error, or
    the artifact proxy's HTTP error), else None."""
    response = getattr(error, "response", None)
    if response is not None and getattr(response, "status_code", None) == 403:
        return (response.text or "Permission denied").strip()
    if getattr(error, "error_code", None) != "PERMISSION_DENIED":
        return None
    text = str(error)
    return text.split("Response body: ", 1)[-1].strip().strip("'") if "Response body: " in text else text


@contextmanager
def refusals_as_errors(what: str, advice: str = ""):
    """A request the server refuses for want of permission, inside the block, becomes one ConfigError line:
    ``what``, the server's sentence, then ``advice``; any other MLflow error propagates as it is."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds

    try:
        yield
    except (MlflowException, HTTPError) as error:
        refused = refusal(error)
        if refused is None:
            raise
        raise ConfigError(f"{what}: {refused}{advice}") from None


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
