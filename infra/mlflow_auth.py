"""The team stack's MLflow server app: MLflow's basic-auth app plus the one rule its permissions cannot express.

MLflow's basic-auth app guards SetRegisteredModelAlias with the same permission (EDIT) as CreateModelVersion, and
gives the creator of a registered model MANAGE on it. The team stack needs "the account that trains registers
versions but cannot move `champion`", so this app adds, on top of basic-auth:

- moving or removing a protected alias (`champion`, XRAY_MLFLOW_PROTECTED_ALIASES), and setting a version's
  `approval` tag to anything but `pending` (approve, reject), need MANAGE on the registered model;
- creating a registered model makes a non-admin its editor (EDIT), not its manager: MANAGE comes from the
  reviewer's grant on every registered model (infra.team_stack sets it up). A promotion lock (a registered model
  that its holder deletes) stays its creator's.

`mlflow server --app-name xray-basic-auth` finds it through the `mlflow.app` entry point in pyproject.toml. The
basic-auth app's own settings (admin, default permission, its database) come from MLFLOW_AUTH_CONFIG_PATH.
"""

from __future__ import annotations

import os

ALIAS_PATHS = ("/api/2.0/mlflow/registered-models/alias", "/ajax-api/2.0/mlflow/registered-models/alias")
TAG_PATHS = ("/api/2.0/mlflow/model-versions/set-tag", "/ajax-api/2.0/mlflow/model-versions/set-tag")
DELETE_TAG_PATHS = ("/api/2.0/mlflow/model-versions/delete-tag", "/ajax-api/2.0/mlflow/model-versions/delete-tag")
CREATE_MODEL_PATHS = ("/api/2.0/mlflow/registered-models/create", "/ajax-api/2.0/mlflow/registered-models/create")
APPROVAL_TAG = "approval"
# xray.registry.store.promotion_lock's mutex is a registered model its holder creates and deletes (MANAGE): it stays
# its creator's to manage.
LOCK_SUFFIX = ".promotion-lock"


def protected_aliases() -> set[str]:
    return {a.strip() for a in os.environ.get("XRAY_MLFLOW_PROTECTED_ALIASES", "champion").split(",") if a.strip()}


def needs_manage(method: str, path: str, params: dict) -> str | None:
    """What the request does that needs MANAGE on its registered model, or None: the rule, apart from Flask."""
    if path in ALIAS_PATHS and method in ("POST", "DELETE") and params.get("alias") in protected_aliases():
        return f"moving the alias '{params['alias']}'"
    if path in TAG_PATHS and method == "POST" and params.get("key") == APPROVAL_TAG:
        if params.get("value") != "pending":
            return f"setting {APPROVAL_TAG}={params.get('value')!r} (an approval or a rejection)"
    if path in DELETE_TAG_PATHS and method == "DELETE" and params.get("key") == APPROVAL_TAG:
        return f"removing the tag {APPROVAL_TAG}"
    return None


def _params(request) -> dict:
    body = request.get_json(silent=True) if request.is_json else None
    return (body if isinstance(body, dict) else {}) | dict(request.args)


def create_app():
    from flask import request
    from mlflow.server import app as flask_app
    from mlflow.server import auth

    def demote_creator(response):
        """Runs after basic-auth's own after-request handler (Flask runs them in reverse order of registration),
        which has just made the creator the model's manager."""
        if request.path in CREATE_MODEL_PATHS and request.method == "POST" and response.status_code == 200:
            username = auth.authenticate_request().username
            if not auth.store.get_user(username).is_admin:
                name = (request.get_json(silent=True) or {}).get("name")
                if name and not name.endswith(LOCK_SUFFIX):
                    auth.store.grant_user_permission(username, "registered_model", name, "EDIT")
        return response

    flask_app.after_request(demote_creator)
    served = auth.create_app(flask_app)

    def protect_champion():
        """Runs after basic-auth's before-request handler, which has authenticated the request (or answered 401)."""
        if request.path not in ALIAS_PATHS + TAG_PATHS + DELETE_TAG_PATHS:
            return None
        params = _params(request)
        action = needs_manage(request.method, request.path, params)
        if action is None or auth.sender_is_admin():
            return None
        username = auth.authenticate_request().username
        if auth._get_registered_model_permission(params.get("name", "")).can_manage:
            return None
        response = flask_app.make_response(
            (
                f"Permission denied: {action} of registered model '{params.get('name')}' needs MANAGE on it, and "
                f"user '{username}' has less (a reviewer's account approves, rejects and rolls back)",
                403,
            )
        )
        return response

    flask_app.before_request(protect_champion)
    return served
