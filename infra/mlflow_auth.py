"""The team stack's MLflow server app: MLflow's basic-auth app plus the rule that makes a version's record the
reviewer's alone, which MLflow's permissions cannot express.

MLflow's basic-auth app lets an EDIT account (the trainer) move any alias, set and delete any tag, rename a model
and overwrite the artifacts of a registered version. On top of it, for a non-admin account without MANAGE on the
registered model (docs/OPERATIONS.md, "Accounts", has the table):

- ``champion`` (XRAY_MLFLOW_PROTECTED_ALIASES) is set and removed with MANAGE only; ``candidate`` may be set by EDIT
  only to a version whose ``approval`` is ``pending`` (what the training pipeline does), and removed with MANAGE;
- a version's tags are append-only: EDIT may add a tag the version does not have (registration records its
  numbers, the gate's decision, ``approval=pending`` and the file digest ``model_sha256`` once), never change or
  delete one; ``history.*`` (the reviewer's record) needs MANAGE even to add, and ``approval`` may be added only as
  ``pending``. ``site.*`` (a site evaluation's measurements, newest wins) is free;
- a version's description (its model card) may be set by EDIT only while empty (at registration);
- renaming or deleting a registered model, deleting a version or moving its stage need MANAGE;
- writing or deleting the artifacts of a registered version (its logged model's or run's folder, through the proxy,
  a multipart or presigned upload, or deleting the logged model) needs MANAGE once the version is sealed (it has
  its digest, an alias or a decision tag): registration completes the folder before it seals it.

One reading of every request: the rule sees the message MLflow's handler will act on (``_get_request_message``: the
JSON body, or the query string of a GET), and a request that carries parameters in both the query string and the
body, or a form, is refused (400). Requests are matched by the route Flask or FastAPI chose, so the ``/ajax-api/``
twins and any static prefix are the same endpoints.

``mlflow server --app-name xray-basic-auth`` finds it through the ``mlflow.app`` entry point in pyproject.toml. The
basic-auth app's own settings (admin, default permission, its database) come from MLFLOW_AUTH_CONFIG_PATH.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

APPROVAL_TAG = "approval"
DIGEST_TAG = "model_sha256"
CANDIDATE_ALIAS = "candidate"
HISTORY_PREFIX = "history."
FREE_TAG_PREFIXES = ("site.",)
"""Measurements a later run replaces (a site evaluation): anyone who may edit the model may rewrite them."""
SEALING_TAGS = (DIGEST_TAG, APPROVAL_TAG, "promotion_decision")
# xray.registry.store.promotion_lock's mutex is a registered model its holder creates and deletes (MANAGE): it stays
# its creator's to manage, and has no versions.
LOCK_SUFFIX = ".promotion-lock"


def protected_aliases() -> set[str]:
    return {a.strip() for a in os.environ.get("XRAY_MLFLOW_PROTECTED_ALIASES", "champion").split(",") if a.strip()}


@dataclass
class Version:
    """What the rule needs of a registered version as the store holds it now."""

    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def sealed(self) -> bool:
        """Its files are final: it has its digest, an alias, or a decision (versions registered before digests)."""
        return bool(self.aliases) or any(key in self.tags for key in SEALING_TAGS)


def needs_manage(operation: str, message: dict, version: Version | None = None) -> str | None:
    """What a registry request does that needs MANAGE on its registered model, or None: the rule, apart from Flask.

    ``operation``: the request's MLflow message name (SetRegisteredModelAlias, ...); ``message``: its fields as the
    handler reads them; ``version``: the version it names, as stored now (None where it names none, or none exists).
    """
    alias, key, value = message.get("alias"), message.get("key"), message.get("value")
    if operation == "SetRegisteredModelAlias":
        if alias in protected_aliases():
            return f"moving the alias '{alias}'"
        if alias == CANDIDATE_ALIAS and (version is None or version.tags.get(APPROVAL_TAG) != "pending"):
            return f"pointing '{alias}' at a version that is not pending approval"
    elif operation == "DeleteRegisteredModelAlias":
        if alias in protected_aliases() | {CANDIDATE_ALIAS}:
            return f"removing the alias '{alias}'"
    elif operation == "SetModelVersionTag":
        return _tag_change(str(key), value, version or Version())
    elif operation == "DeleteModelVersionTag":
        if not str(key).startswith(FREE_TAG_PREFIXES):
            return f"removing the tag {key} (the version's record)"
    elif operation == "UpdateModelVersion":
        if version is not None and version.description and message.get("description") != version.description:
            return "rewriting the version's description (its model card)"
    elif operation in MANAGED:
        return MANAGED[operation]
    return None


MANAGED = {
    "RenameRegisteredModel": "renaming the registered model",
    "DeleteRegisteredModel": "deleting the registered model",
    "DeleteModelVersion": "deleting a version",
    "TransitionModelVersionStage": "moving a version's stage",
}


def _tag_change(key: str, value, version: Version) -> str | None:
    if key.startswith(FREE_TAG_PREFIXES):
        return None
    if key.startswith(HISTORY_PREFIX):
        return f"writing {key} (the reviewer's record)"
    if key == APPROVAL_TAG and APPROVAL_TAG not in version.tags and value != "pending":
        return f"setting {APPROVAL_TAG}={value!r} (an approval or a rejection)"
    if key in version.tags and version.tags[key] != value:
        return f"changing the tag {key} (the version's record: tags are added once, changed by a reviewer)"
    return None


# -- the artifacts of registered versions -------------------------------------------------------------------------


def folder_of(source: str | None, model_id: str | None) -> tuple[str, ...] | None:
    """The artifact-proxy path segments that hold a version's files: ``("models", <id>)`` for an MLflow 3 logged model
    (under any experiment), else the segments of an ``mlflow-artifacts:/`` source."""
    source = source or ""
    if not model_id and source.startswith("models:/m-"):
        model_id = source.removeprefix("models:/").split("/")[0]
    if model_id:
        return ("models", model_id)
    if source.startswith("mlflow-artifacts:"):
        return tuple(s for s in re.sub(r"^mlflow-artifacts:(//[^/]*)?", "", source).split("/") if s)
    return None


def touches(path: tuple[str, ...], folder: tuple[str, ...], recursive: bool) -> bool:
    """Whether writing ``path`` (deleting it, when ``recursive``) changes a file of ``folder``."""
    if folder[0] == "models":  # <experiment>/models/<id>/...: any experiment
        path = path[1:] if path and path[0].isdigit() else path
        if not path or (recursive and len(path) == 1 and path[0] == "models"):
            return recursive
    if path[: len(folder)] == folder:
        return True
    return recursive and folder[: len(path)] == path


def artifact_refusal(path: tuple[str, ...], recursive: bool, sealed_folders: dict) -> str | None:
    """The registered model whose sealed version ``path`` would change, or None. ``sealed_folders``: folder -> name."""
    for folder, name in sealed_folders.items():
        if touches(path, folder, recursive):
            return name
    return None


def sealed_folders(registry_store) -> dict[tuple[str, ...], str]:
    """Every sealed version's folder, with its registered model's name."""
    folders, token = {}, None
    while True:
        page = registry_store.search_model_versions(max_results=1000, page_token=token)
        for mv in page:
            state = Version(dict(mv.tags or {}), list(mv.aliases or []), mv.description or "")
            folder = folder_of(mv.source, getattr(mv, "model_id", None))
            if folder and state.sealed and not mv.name.endswith(LOCK_SUFFIX):
                folders[folder] = mv.name
        token = page.token
        if not token:
            return folders


def path_segments(path: str) -> tuple[str, ...]:
    """The canonical segments the handler writes to (MLflow's own validation: decoded, no ``..``); raises on a path
    MLflow would refuse."""
    from mlflow.utils.uri import validate_path_is_safe

    canonical = validate_path_is_safe(path)
    segments = tuple(s for s in canonical.split("/") if s)
    if len(segments) > 2 and segments[0] == "workspaces":
        segments = segments[2:]
    return segments


# -- the server ---------------------------------------------------------------------------------------------------

REGISTRY_OPERATIONS = (
    "SetRegisteredModelAlias",
    "DeleteRegisteredModelAlias",
    "SetModelVersionTag",
    "DeleteModelVersionTag",
    "UpdateModelVersion",
    *MANAGED,
)
ARTIFACT_OPERATIONS = {
    # operation -> recursive (a delete reaches every file below its path)
    "UploadArtifact": False,
    "DeleteArtifact": True,
    "CreateMultipartUpload": False,
    "CompleteMultipartUpload": False,
    "AbortMultipartUpload": False,
}
LOGGED_MODEL_OPERATIONS = ("DeleteLoggedModel", "FinalizeLoggedModel", "CreatePresignedUploadUrl")
CREATE_MODEL = "CreateRegisteredModel"


def guarded_routes() -> dict[tuple[str, str], type]:
    """(Flask rule, method) -> MLflow request class, for every route of the operations above (ajax twins included)."""
    from mlflow.server.handlers import get_endpoints

    names = {*REGISTRY_OPERATIONS, *ARTIFACT_OPERATIONS, *LOGGED_MODEL_OPERATIONS, CREATE_MODEL}
    return {
        (path, method): request_class
        for path, request_class, methods in get_endpoints(lambda request_class: request_class)
        if getattr(request_class, "__name__", None) in names
        for method in methods
    }


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def read_message(request, request_class) -> dict:
    """The fields MLflow's handler will act on, read by MLflow's own reader; a request with two carriers is refused."""
    from google.protobuf.json_format import MessageToDict
    from mlflow.exceptions import MlflowException
    from mlflow.server.handlers import _get_request_message

    has_body = bool(request.get_data(cache=True))
    if request.form or (request.args and (has_body or request.method != "GET")):
        raise Refused(
            400,
            "parameters in the query string or a form where MLflow reads the JSON body (or in both): send them in "
            "one place, the JSON body (the query string for a GET)",
        )
    try:
        message = _get_request_message(request_class())
    except MlflowException as error:
        raise Refused(400, error.message) from None
    return MessageToDict(message, preserving_proto_field_name=True)


def current_version(name: str, version: str | None) -> Version | None:
    from mlflow.exceptions import MlflowException
    from mlflow.server.handlers import _get_model_registry_store

    if not name or not version:
        return None
    try:
        mv = _get_model_registry_store().get_model_version(name, str(version))
    except MlflowException:
        return None
    return Version(dict(mv.tags or {}), list(mv.aliases or []), mv.description or "")


def models_named(operation: str, message: dict) -> list[str]:
    """The registered models whose MANAGE the operation needs: a rename needs it on the new name too (renaming one's
    own promotion lock onto a model that does not exist yet would otherwise make its creator that model's manager)."""
    names = [message.get("name", "")]
    return names + [message.get("new_name", "")] if operation == "RenameRegisteredModel" else names


def sealed_owner_of_logged_model(model_id: str) -> str | None:
    from mlflow.server.handlers import _get_model_registry_store

    return sealed_folders(_get_model_registry_store()).get(("models", model_id))


def artifact_owner(request, operation: str) -> str | None:
    """The registered model whose sealed version this artifact request would change, or None."""
    from mlflow.server.handlers import _get_model_registry_store

    if operation in ARTIFACT_OPERATIONS:
        path = (request.view_args or {}).get("artifact_path") or ""
        try:
            segments = path_segments(path)
        except Exception:  # noqa: BLE001 - MLflow's handler refuses the same path
            return None
        return artifact_refusal(segments, ARTIFACT_OPERATIONS[operation], sealed_folders(_get_model_registry_store()))
    model_id = (request.view_args or {}).get("model_id")
    return sealed_owner_of_logged_model(model_id) if model_id else None


def refusal_text(action: str, name: str, username: str) -> str:
    return (
        f"Permission denied: {action} of registered model '{name}' needs MANAGE on it, and user '{username}' has "
        "less (a reviewer's account approves, rejects, rolls back and changes a sealed version)"
    )


def create_app():
    from flask import request
    from mlflow.server import app as flask_app
    from mlflow.server import auth

    routes = guarded_routes()

    def may_manage(name: str) -> bool:
        return auth.sender_is_admin() or auth._get_registered_model_permission(name).can_manage

    def decide() -> tuple[int, str] | None:
        """(status, text) of a refusal for the current Flask request, or None."""
        rule = request.url_rule.rule if request.url_rule is not None else None
        request_class = routes.get((rule, request.method))
        if request_class is None or request_class.__name__ == CREATE_MODEL:
            return None
        operation = request_class.__name__
        if operation in ARTIFACT_OPERATIONS or operation in LOGGED_MODEL_OPERATIONS[:2]:
            owner = artifact_owner(request, operation)
            action = "writing the files of a sealed version"
        else:
            message = read_message(request, request_class)
            if operation == "CreatePresignedUploadUrl":
                owner = sealed_owner_of_logged_model(message.get("model_id", "")) if message.get("model_id") else None
                action = "uploading into a sealed version"
            else:
                version = current_version(message.get("name", ""), message.get("version"))
                action = needs_manage(operation, message, version)
                owners = models_named(operation, message) if action else []
                owner = next((name for name in owners if not may_manage(name)), None)
        if owner is None or may_manage(owner):
            return None
        return 403, refusal_text(action, owner, auth.authenticate_request().username)

    def guard():
        """Runs after basic-auth's before-request handler, which has authenticated the request (or answered 401)."""
        try:
            refused = decide()
        except Refused as error:
            refused = error.status, error.message
        return flask_app.make_response((refused[1], refused[0])) if refused else None

    def demote_creator(response):
        """Runs after basic-auth's own after-request handler (Flask runs them in reverse order of registration),
        which has just made the creator the model's manager."""
        rule = request.url_rule.rule if request.url_rule is not None else None
        request_class = routes.get((rule, request.method))
        if request_class is not None and request_class.__name__ == CREATE_MODEL and response.status_code == 200:
            username = auth.authenticate_request().username
            if not auth.store.get_user(username).is_admin:
                name = (request.get_json(silent=True) or {}).get("name")
                if name and not name.endswith(LOCK_SUFFIX):
                    auth.store.grant_user_permission(username, "registered_model", name, "EDIT")
        return response

    flask_app.after_request(demote_creator)
    served = auth.create_app(flask_app)
    flask_app.before_request(guard)
    if served is not flask_app:  # uvicorn: FastAPI serves artifact uploads itself, before Flask sees them
        add_upload_guard(served, flask_app, auth)
    return served


UPLOAD_PATH = re.compile(r"^(?:.*?)/(?:api|ajax-api)/2\.0/mlflow-artifacts/artifacts/(?P<path>.+)$")


def add_upload_guard(app, flask_app, auth) -> None:
    """FastAPI serves ``PUT .../mlflow-artifacts/artifacts/<path>`` natively: the same rule, as an HTTP middleware
    that runs before MLflow's own (which answers 401 to a request without credentials)."""
    from mlflow.server.handlers import _get_model_registry_store
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import PlainTextResponse

    def refusal(path: str, artifact_path: str, headers: dict) -> str | None:
        """The refusal of an upload as the credentials in ``headers``, or None (MLflow's own checks follow)."""
        with flask_app.test_request_context(path, method="PUT", headers=headers):
            user = auth.authenticate_request() if headers else None
            if getattr(user, "username", None) is None:
                return None  # MLflow's middleware answers 401
            try:
                segments = path_segments(artifact_path)
            except Exception:  # noqa: BLE001 - MLflow's handler refuses the same path
                return None
            owner = artifact_refusal(segments, False, sealed_folders(_get_model_registry_store()))
            if owner is None or auth.store.get_user(user.username).is_admin:
                return None
            if auth._get_registered_model_permission(owner).can_manage:
                return None
            return refusal_text("writing the files of a sealed version", owner, user.username)

    @app.middleware("http")
    async def guard_uploads(request, call_next):
        match = UPLOAD_PATH.match(request.scope.get("path", ""))
        if request.method != "PUT" or match is None:
            return await call_next(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        text = await run_in_threadpool(refusal, request.scope["path"], match.group("path"), headers)
        return PlainTextResponse(text, status_code=403) if text else await call_next(request)
