"""The team stack's MLflow server app: MLflow's basic-auth app plus the rule that makes a version's record the
reviewer's alone, which MLflow's permissions cannot express.

MLflow's basic-auth app lets an EDIT account (the trainer) move any alias, set and delete any tag, rename a model
and overwrite the artifacts of a registered version. On top of it, for a non-admin account without MANAGE on the
registered model (docs/OPERATIONS.md, "Accounts", has the table):

- ``champion`` (XRAY_MLFLOW_PROTECTED_ALIASES) is set and removed with MANAGE only; ``candidate`` may be set by EDIT
  only to a version whose ``approval`` is ``pending`` (what the training pipeline does), and removed with MANAGE;
- a version's tags are append-only: EDIT may add a tag the version does not have, never change or delete one;
  ``history.*`` (the reviewer's record) needs MANAGE even to add; the decision tags (``approval``, ``promotion_*``,
  ``gate.*``, ``model_sha256``, ``card_sha256``, ``operating_point.*``) may be added by EDIT only before the
  version is sealed, ``approval`` only as ``pending`` and ``promotion_decision`` only as ``pending_approval`` or
  ``rejected`` (a promotion is a reviewer's). The same holds for the tags a version is created with. ``site.*`` (a
  site evaluation's measurements, newest wins) is free;
- a version's description (its model card) may be set by EDIT only while empty (at registration);
- renaming (MANAGE on both names) or deleting a registered model, deleting a version or moving its stage need MANAGE;
- writing or deleting the files of a sealed version (its logged model's or run's folder: through the artifact proxy,
  a multipart or presigned upload, the UI's upload route, or deleting the logged model) needs MANAGE on every
  registered model with a version there. A version is sealed once it has its digest (``model_sha256``), an alias or a
  ``history.*`` record: registration completes the folder and its record before it seals it.

One reading of every request: the rule sees the message MLflow's handler will act on (``_get_request_message``: the
JSON body, or the query string of a GET), and a request that carries parameters in both the query string and the
body, or a form, is refused (400); so is an artifact path with ``.`` or empty segments. Requests are matched by the
route Flask or FastAPI chose, so the ``/ajax-api/`` twins and any static prefix are the same endpoints. Uploads that
FastAPI serves itself are checked after MLflow's own permission middleware, as the account it authenticated.

``mlflow server --app-name xray-basic-auth`` finds it through the ``mlflow.app`` entry point in pyproject.toml. The
basic-auth app's own settings (admin, default permission, its database) come from MLFLOW_AUTH_CONFIG_PATH.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

APPROVAL_TAG = "approval"
DIGEST_TAG = "model_sha256"
CANDIDATE_ALIAS = "candidate"
HISTORY_PREFIX = "history."
FREE_TAG_PREFIXES = ("site.",)
"""Measurements a later run replaces (a site evaluation): anyone who may edit the model may rewrite them."""
DECISION_TAGS = (APPROVAL_TAG, DIGEST_TAG, "card_sha256", "promotion_decision", "promotion_reason")
DECISION_PREFIXES = ("gate.", "operating_point.")
EDIT_MAY_DECIDE = {APPROVAL_TAG: ("pending",), "promotion_decision": ("pending_approval", "rejected")}
# xray.registry.store.promotion_lock's mutex is a registered model its holder creates and deletes (MANAGE): it stays
# its creator's to manage, and has no versions.
LOCK_SUFFIX = ".promotion-lock"
logger = logging.getLogger(__name__)


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
        """Its files and record are final: it has its digest, an alias, or a reviewer's record."""
        return DIGEST_TAG in self.tags or bool(self.aliases) or any(k.startswith(HISTORY_PREFIX) for k in self.tags)


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
        return tag_change(str(key), value, version or Version())
    elif operation == "CreateModelVersion":
        return next(
            filter(None, (tag_change(t.get("key", ""), t.get("value"), Version()) for t in message.get("tags", []))),
            None,
        )
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


def tag_change(key: str, value, version: Version) -> str | None:
    """What setting tag ``key`` to ``value`` on ``version`` does that needs MANAGE, or None."""
    if key.startswith(FREE_TAG_PREFIXES):
        return None
    if key.startswith(HISTORY_PREFIX):
        return f"writing {key} (the reviewer's record)"
    if key in version.tags:
        return (
            None
            if version.tags[key] == value
            else f"changing the tag {key} (tags are added once; a reviewer changes them)"
        )
    if key in DECISION_TAGS or key.startswith(DECISION_PREFIXES):
        if version.sealed:
            return f"adding the decision tag {key} to a sealed version"
        if key in EDIT_MAY_DECIDE and value not in EDIT_MAY_DECIDE[key]:
            return f"setting {key}={value!r} (a reviewer's decision)"
    return None


# -- the artifacts of registered versions -------------------------------------------------------------------------


def folder_of(source: str | None, model_id: str | None, run_artifacts=lambda run_id: None) -> tuple[str, ...] | None:
    """The artifact-proxy path segments that hold a version's files: ``("models", <id>)`` for an MLflow 3 logged model
    (under any experiment), else the segments of its ``mlflow-artifacts:`` source, or of a ``runs:/`` source's run
    (``run_artifacts``: run id -> its ``mlflow-artifacts:`` URI)."""
    source = source or ""
    if not model_id and source.startswith("models:/m-"):
        model_id = source.removeprefix("models:/").split("/")[0]
    if model_id:
        return ("models", model_id)
    if source.startswith("runs:/"):
        run_id, _, path = source.removeprefix("runs:/").partition("/")
        base = run_artifacts(run_id)
        source = f"{base.rstrip('/')}/{path}" if base else ""
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


def artifact_owners(path: tuple[str, ...], recursive: bool, sealed: dict) -> set[str]:
    """The registered models with a sealed version whose files ``path`` would change. ``sealed``: folder -> names."""
    return {name for folder, names in sealed.items() if touches(path, folder, recursive) for name in names}


def _paged(search):
    token = None
    while True:
        page = search(max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def sealed_folders(registry_store, run_artifacts=lambda run_id: None) -> dict[tuple[str, ...], set[str]]:
    """Every sealed version's folder, with the names of the registered models that have a version there. (A version
    found by a search carries no aliases: they come from the registered models.)"""
    aliased: dict[tuple[str, str], list[str]] = {}
    for model in _paged(registry_store.search_registered_models):
        for alias, number in (model.aliases or {}).items():
            aliased.setdefault((model.name, str(number)), []).append(alias)
    folders: dict[tuple[str, ...], set[str]] = {}
    for mv in _paged(registry_store.search_model_versions):
        state = Version(dict(mv.tags or {}), aliased.get((mv.name, str(mv.version)), []), mv.description or "")
        folder = folder_of(mv.source, getattr(mv, "model_id", None), run_artifacts)
        if folder and state.sealed and not mv.name.endswith(LOCK_SUFFIX):
            folders.setdefault(folder, set()).add(mv.name)
    return folders


def path_segments(path: str) -> tuple[str, ...]:
    """The canonical segments the handler writes to (MLflow's own validation: decoded, no ``..``); a path MLflow would
    refuse, or with a ``.`` or an empty segment (two spellings of one object key), raises :class:`Refused`."""
    from mlflow.utils.uri import validate_path_is_safe

    try:
        canonical = validate_path_is_safe(path)
    except Exception:  # noqa: BLE001 - MLflow's own refusal, answered here before its handler
        raise Refused(400, "Invalid artifact path") from None
    segments = tuple(canonical.strip("/").split("/"))
    if any(s in ("", ".") for s in segments):
        raise Refused(400, "an artifact path with '.' or empty segments: write it in one canonical spelling")
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
    "CreateModelVersion",
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
LOGGED_MODEL_OPERATIONS = ("DeleteLoggedModel", "FinalizeLoggedModel")
UPLOAD_URL, CREATE_MODEL, UI_UPLOAD = "CreatePresignedUploadUrl", "CreateRegisteredModel", "serve_upload_artifact"


def guarded_routes() -> dict[tuple[str, str], type]:
    """(Flask rule, method) -> MLflow request class, for every route of the operations above (ajax twins included)."""
    from mlflow.server.handlers import get_endpoints

    names = {*REGISTRY_OPERATIONS, *ARTIFACT_OPERATIONS, *LOGGED_MODEL_OPERATIONS, UPLOAD_URL, CREATE_MODEL}
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


def run_artifacts(run_id: str) -> str | None:
    """A run's artifact URI (``mlflow-artifacts:/<experiment>/<run>/artifacts``), None when there is no such run."""
    from mlflow.server.handlers import _get_tracking_store

    try:
        return _get_tracking_store().get_run(run_id).info.artifact_uri
    except Exception:  # noqa: BLE001 - no run: nothing of a version lives there
        return None


def sealed_now() -> dict:
    from mlflow.server.handlers import _get_model_registry_store

    return sealed_folders(_get_model_registry_store(), run_artifacts)


def owners_of_logged_model(model_id: str) -> set[str]:
    return sealed_now().get(("models", model_id), set())


def artifact_request_owners(request, operation: str) -> set[str]:
    """The registered models whose sealed version this artifact request would change."""
    if operation in ARTIFACT_OPERATIONS:
        segments = path_segments((request.view_args or {}).get("artifact_path") or "")
        return artifact_owners(segments, ARTIFACT_OPERATIONS[operation], sealed_now())
    if operation == UI_UPLOAD:
        base = folder_of(run_artifacts(request.args.get("run_uuid", "")), None)
        target = (*base, *path_segments(request.args.get("path", ""))) if base else None
        return artifact_owners(target, False, sealed_now()) if target else set()
    return owners_of_logged_model((request.view_args or {}).get("model_id") or "")


def refusal_text(action: str, name: str, username: str) -> str:
    return (
        f"Permission denied: {action} of registered model '{name}' needs MANAGE on it, and user '{username}' has "
        "less (a reviewer's account approves, rejects, rolls back and changes a sealed version)"
    )


def manages(auth, username: str, name: str) -> bool:
    """Whether ``username`` is an admin or has MANAGE on the registered model ``name`` (MLflow's own grants)."""
    from mlflow.server.handlers import _get_model_registry_store

    if auth.store.get_user(username).is_admin:
        return True
    found = auth._role_permission_for(
        username, "registered_model", name, name, _get_model_registry_store().get_registered_model, "registered model"
    )
    return auth._get_role_permission_or_default(found).can_manage


def create_app():
    from flask import request
    from mlflow.server import app as flask_app
    from mlflow.server import auth

    routes = guarded_routes()

    def operation_of() -> str | None:
        if request.endpoint == UI_UPLOAD:
            return UI_UPLOAD
        rule = request.url_rule.rule if request.url_rule is not None else None
        request_class = routes.get((rule, request.method))
        return request_class.__name__ if request_class is not None else None

    def decide() -> tuple[int, str] | None:
        """(status, text) of a refusal for the current Flask request, or None."""
        operation = operation_of()
        if operation is None or operation == CREATE_MODEL:
            return None
        if operation in ARTIFACT_OPERATIONS or operation in LOGGED_MODEL_OPERATIONS or operation == UI_UPLOAD:
            owners, action = artifact_request_owners(request, operation), "writing the files of a sealed version"
        else:
            request_class = next(c for (rule, m), c in routes.items() if c.__name__ == operation)
            message = read_message(request, request_class)
            if operation == UPLOAD_URL:
                owners, action = owners_of_logged_model(message.get("model_id", "")), "uploading into a sealed version"
            else:
                version = current_version(message.get("name", ""), message.get("version"))
                action = needs_manage(operation, message, version)
                owners = set(models_named(operation, message)) if action else set()
        username = auth.authenticate_request().username
        refused = next((name for name in sorted(owners) if not manages(auth, username, name)), None)
        return None if refused is None else (403, refusal_text(action, refused, username))

    def guard():
        """Runs after basic-auth's before-request handler, which has authenticated the request (or answered 401)."""
        try:
            refused = decide()
        except Refused as error:
            refused = error.status, error.message
        return flask_app.make_response((refused[1], refused[0])) if refused else None

    def demote_creator(response):
        """Runs after basic-auth's own after-request handler (Flask runs them in reverse order of registration),
        which has just made the creator the model's manager: the name comes from MLflow's own answer, whatever the
        request's spelling, and a failure here never leaves the grant in place."""
        if operation_of() != CREATE_MODEL or response.status_code != 200:
            return response
        username = auth.authenticate_request().username
        if auth.store.get_user(username).is_admin:
            return response
        try:
            name = (response.get_json(silent=True) or {}).get("registered_model", {}).get("name", "")
        except AttributeError:
            name = ""
        if name and not name.endswith(LOCK_SUFFIX):
            auth.store.grant_user_permission(username, "registered_model", name, "EDIT")
        elif not name:
            logger.error("a registered model created by %s could not be identified; its grant stays MANAGE", username)
        return response

    flask_app.after_request(demote_creator)
    served = auth.create_app(flask_app)
    flask_app.before_request(guard)
    if served is not flask_app:  # uvicorn: FastAPI serves artifact uploads itself, before Flask sees them
        add_upload_guard(served, auth)
    return served


UPLOAD_PATH = re.compile(r"^(?:.*?)/(?:api|ajax-api)/2\.0/mlflow-artifacts/artifacts/(?P<path>.+)$")


def add_upload_guard(app, auth) -> None:
    """FastAPI serves ``PUT .../mlflow-artifacts/artifacts/<path>`` natively: the same rule, as the innermost HTTP
    middleware, after MLflow's own permission middleware has authenticated the request (``request.state.username``);
    a request it did not authenticate, or with more than one Authorization header, is refused."""
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse

    def refusal(artifact_path: str, username: str) -> tuple[int, str] | None:
        try:
            owners = artifact_owners(path_segments(artifact_path), False, sealed_now())
        except Refused as error:
            return error.status, error.message
        refused = next((name for name in sorted(owners) if not manages(auth, username, name)), None)
        return (
            None if refused is None else (403, refusal_text("writing the files of a sealed version", refused, username))
        )

    async def guard_uploads(request, call_next):
        match = UPLOAD_PATH.match(request.scope.get("path", ""))
        if request.method != "PUT" or match is None:
            return await call_next(request)
        username = getattr(request.state, "username", None)
        if username is None or len(request.headers.getlist("authorization")) > 1:
            return PlainTextResponse("Permission denied: one authenticated request per upload", status_code=403)
        refused = await run_in_threadpool(refusal, match.group("path"), username)
        return PlainTextResponse(refused[1], status_code=refused[0]) if refused else await call_next(request)

    app.user_middleware.append(Middleware(BaseHTTPMiddleware, dispatch=guard_uploads))  # the innermost
