"""A person's decisions (``approve``, ``reject``, ``rollback``, a site's operating point): made in the registry
(xray.registry.decisions) as the signed-in account, and the ZenML Model version of the training run follows."""

import logging
from collections.abc import Callable
from functools import partial
from uuid import UUID

from mlflow.tracking import MlflowClient
from zenml.client import Client

from steps.logstore import audit_trail
from xray.errors import ConfigError
from xray.registry import decisions, tracking
from xray.requests import DecisionRequest

logger = logging.getLogger(__name__)


def signed_in(request: DecisionRequest) -> str:
    """Who the record names: on a tracking server with accounts the signed-in MLFLOW_TRACKING_USERNAME (a different
    --reviewer is refused), else the typed --reviewer."""
    uri, reviewer = request.config.registry.tracking_uri, request.reviewer
    user = tracking.authenticated_user(uri)
    if user is not None and reviewer and reviewer != user:
        raise ConfigError(
            f"--reviewer {reviewer} is not the MLflow account signed in ({user}): the record names the signed-in "
            "account; drop --reviewer"
        )
    if not (user or reviewer):
        raise ConfigError(f"{request.action} needs --reviewer NAME: the MLflow server at {uri} has no accounts")
    return user or str(reviewer)


def decide(request: DecisionRequest) -> dict:
    """The decision, one line when the server refuses it; the ZenML stage follows (production, archived)."""
    registry, version, reason = request.config.registry, request.model_version, request.reason
    reviewer = signed_in(request)
    client = MlflowClient(tracking_uri=registry.tracking_uri)
    trail = audit_trail()
    if request.operating_point is not None:  # approve --operating-point SITE:ID, not the version itself
        with tracking.refusals_as_errors(f"MLflow refused the operating point by account '{reviewer}'"):
            result = decisions.apply_operating_point(
                client, registry, version, request.operating_point, reviewer, reason
            )
        details = {"model_name": registry.model_name, "model_version": version, "site": result["site"]}
        trail.append(
            "operating point", reviewer, reason, details | {"threshold": result["operating_point"]["threshold"]}
        )
        return result | {"model_name": registry.model_name}
    decide_by: dict[str, Callable[..., dict]] = {
        "approve": partial(decisions.approve, approved_plans=trail.approved_plans()),
        "reject": decisions.reject,
        "rollback": decisions.rollback,
    }
    with tracking.refusals_as_errors(f"MLflow refused the {request.action} by account '{reviewer}'"):
        result = decide_by[request.action](client, registry, version, reviewer, reason)
    kind = {"approve": "approval", "reject": "rejection", "rollback": "rollback"}[request.action]
    about = {"model_name": registry.model_name, "model_version": version}
    trail.append(kind, reviewer, reason, about | {"previous_champion": result.get("previous_champion")})
    zenml_id = client.get_model_version(registry.model_name, version).tags.get("zenml.model_version_id")
    stage = "archived" if request.action == "reject" else "production"
    if zenml_id:
        Client().update_model_version(registry.model_name, UUID(zenml_id), stage=stage, force=True)
        result["zenml_stage"] = stage
    else:
        logger.warning(
            "v%s has no ZenML Model version recorded (registered before approvals): its stage stays", version
        )
    return result | {"model_name": registry.model_name, "mlflow_tracking_uri": registry.tracking_uri}
