"""Which ZenML stack a run uses, and the MLflow tracking URI that comes with it.

The stack's MLflow experiment tracker is the one source of the tracking URI: the steps log through it and
run.py pins the same URI into the config for the registry reads. The local default is the stack `xray-local`
(ZenML's default orchestrator and artifact store plus the MLflow tracker `xray-mlflow-local` on the local
SQLite store), created on first use the way the embedded S3 endpoint is started: with a log line, never behind
the user's back.
"""

from __future__ import annotations

import logging
import os

from xray.errors import ConfigError

LOCAL_STACK = "xray-local"
LOCAL_TRACKER = "xray-mlflow-local"
logger = logging.getLogger(__name__)


def ensure_local_stack(client, tracking_uri: str) -> None:
    """`xray-local`: local orchestrator and artifact store, an MLflow tracker on ``tracking_uri`` (kept in step with
    MLFLOW_TRACKING_URI / registry.tracking_uri, which decide the local store)."""
    from zenml.enums import StackComponentType as Kind

    trackers = client.list_stack_components(type=Kind.EXPERIMENT_TRACKER, name=LOCAL_TRACKER).items
    if not trackers:
        client.create_stack_component(LOCAL_TRACKER, "mlflow", Kind.EXPERIMENT_TRACKER, {"tracking_uri": tracking_uri})
        logger.info("registered the MLflow experiment tracker %s on %s", LOCAL_TRACKER, tracking_uri)
    elif trackers[0].configuration.get("tracking_uri") != tracking_uri:
        client.update_stack_component(
            LOCAL_TRACKER, Kind.EXPERIMENT_TRACKER, configuration={"tracking_uri": tracking_uri}
        )
        logger.info("MLflow experiment tracker %s now tracks to %s", LOCAL_TRACKER, tracking_uri)
    if not client.list_stacks(name=LOCAL_STACK).items:
        default = client.get_stack("default")
        client.create_stack(
            LOCAL_STACK,
            components={
                Kind.ORCHESTRATOR: default.components[Kind.ORCHESTRATOR][0].name,
                Kind.ARTIFACT_STORE: default.components[Kind.ARTIFACT_STORE][0].name,
                Kind.EXPERIMENT_TRACKER: LOCAL_TRACKER,
            },
        )
        logger.info(
            "registered the ZenML stack %s (local orchestrator and artifact store, MLflow tracker %s)",
            LOCAL_STACK,
            LOCAL_TRACKER,
        )


def use_stack(name: str | None, local_tracking_uri: str, explicit_uri: bool = False) -> tuple[str, str]:
    """Activate the stack a run uses and return (its name, its MLflow tracking URI).

    ``name`` None: the active stack when it has an experiment tracker, else `xray-local`. ``explicit_uri``: the
    local URI was set by MLFLOW_TRACKING_URI or registry.tracking_uri, which another stack's tracker overrides.
    """
    from zenml.client import Client
    from zenml.enums import StackComponentType as Kind

    client = Client()
    if name is None:
        active = client.active_stack_model
        if active.components.get(Kind.EXPERIMENT_TRACKER):
            name = active.name
        else:
            logger.info(
                "the active ZenML stack '%s' has no experiment tracker: running on '%s'", active.name, LOCAL_STACK
            )
            name = LOCAL_STACK
    if name == LOCAL_STACK:
        ensure_local_stack(client, local_tracking_uri)
    if not client.list_stacks(name=name).items:
        known = ", ".join(sorted(s.name for s in client.list_stacks(size=100).items))
        hint = " (start it with `make team-stack`)" if name == "team" else ""
        raise ConfigError(f"no ZenML stack '{name}' on {client.zen_store.url}{hint}; stacks there: {known}")
    # The stored component, not client.active_stack (cached, and it may predate an update above); checked before the
    # stack is activated, so a refused stack leaves the active one as it was.
    from zenml.stack import StackComponent

    trackers = client.get_stack(name).components.get(Kind.EXPERIMENT_TRACKER) or []
    tracker = (
        StackComponent.from_model(client.get_stack_component(Kind.EXPERIMENT_TRACKER, trackers[0].id))
        if trackers
        else None
    )
    if tracker is None or tracker.flavor != "mlflow":
        raise ConfigError(
            f"ZenML stack '{name}' has no MLflow experiment tracker; add one "
            f"(zenml stack update {name} -e <mlflow tracker>) or run with --stack {LOCAL_STACK}"
        )
    if client.active_stack_model.name != name:
        client.activate_stack(name)
    uri = tracker.get_tracking_uri()
    # The tracker's account (from its ZenML secret) for this process's own MLflow calls too, unless the user signed
    # in with another (MLFLOW_TRACKING_USERNAME: a reviewer approving).
    username, password = tracker.config.tracking_username, tracker.config.tracking_password
    if username and password and not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = username, password
    if name != LOCAL_STACK and local_tracking_uri != uri and explicit_uri:
        logger.warning(
            "MLFLOW_TRACKING_URI / registry.tracking_uri (%s) is ignored: stack '%s' tracks to %s",
            local_tracking_uri,
            name,
            uri,
        )
    return name, uri


def prediction_log_root() -> str:
    """The active stack's prediction log, <artifact store>/prediction_log (what `make serve` logs to)."""
    from zenml.client import Client

    return Client().active_stack.artifact_store.path.rstrip("/") + "/prediction_log"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["prediction-log"]:
        sys.exit("usage: python -m infra.stacks prediction-log")
    print(prediction_log_root())
