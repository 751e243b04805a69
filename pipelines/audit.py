"""``audit verify | show | approve-plan``: the audit trail of the active stack's artifact store (steps/logstore.py),
checked, listed, or given the reviewer's approval of the config's change plan (xray.registry.control)."""

import json
import logging

from steps.logstore import audit_trail
from xray.errors import ConfigError
from xray.registry import tracking
from xray.registry.control import audit
from xray.registry.control.plan import plan_digest
from xray.requests import AuditRequest

logger = logging.getLogger(__name__)


def run_audit(request: AuditRequest):
    """The summary of the action (a listing's text for ``show`` without ``--json``)."""
    trail = audit_trail()
    checked = trail.verify()
    state = {"trail": str(trail.files.root), "records": checked.records, "intact": checked.ok}
    if not checked.ok:
        state |= {"broken": checked.broken, "why": checked.why}
        logger.error("the audit trail is broken at %s: %s", checked.broken, checked.why)
    if request.action == "verify":
        return state
    if request.action == "show":
        records = trail.records()
        if request.as_json:
            listed = [{k: v for k, v in record.items() if k != "file"} for record in records]
            return state | {"records": listed, "files": [record["file"] for record in records]}
        return "\n".join([*(_line(record) for record in records), json.dumps(state, sort_keys=True)])
    if not checked.ok:
        raise ConfigError(f"the audit trail is broken at {checked.broken} ({checked.why}): no approval is added to it")
    return approve_plan(request, trail)


def _line(record: dict) -> str:
    if record.get("unreadable"):
        return f"(unreadable) {record['file']}"
    details = json.dumps(record.get("details", {}), sort_keys=True, separators=(",", ":"))
    return f"{record.get('seq')}\t{record.get('at')}\t{record.get('who')}\t{record.get('what')}\t{record.get('why')}\t{details}"


def reviewer_account(request: AuditRequest) -> str:
    """Who approves a plan: on a tracking server with accounts the signed-in account, which must be the reviewer's
    (MANAGE on the registered model, infra/team/mlflow.py), and a different --reviewer is refused; without accounts
    the typed --reviewer."""
    registry = request.config.registry
    account = tracking.may_promote(registry.tracking_uri, registry.model_name)
    if account is None:
        if not request.reviewer:
            raise ConfigError(
                f"audit approve-plan needs --reviewer NAME: the MLflow server at {registry.tracking_uri} has no accounts"
            )
        return request.reviewer
    user, manages = account
    if request.reviewer and request.reviewer != user:
        raise ConfigError(
            f"--reviewer {request.reviewer} is not the MLflow account signed in ({user}): drop --reviewer"
        )
    if not manages:
        raise ConfigError(
            f"the MLflow account '{user}' is not a reviewer (no MANAGE on {registry.model_name}): a change plan is "
            "approved by the reviewer account"
        )
    return user


def approve_plan(request: AuditRequest, trail: audit.Trail) -> dict:
    """The config's change plan, recorded (as a plan version, when new) and approved by the reviewer."""
    plan = request.config.change_plan
    assert plan is not None and request.reason is not None  # AuditRequest requires both for approve-plan
    digest, who = plan_digest(plan), reviewer_account(request)
    if digest in trail.approved_plans():
        raise ConfigError(f"change plan v{plan.version} ({digest[:12]}) is already approved")
    details = {"plan_version": plan.version, "plan_digest": digest, "plan": plan.model_dump(mode="json")}
    if not trail.has_plan(digest):
        trail.append("plan version", who, f"change plan v{plan.version} put to the reviewer", details)
    record = trail.append("plan approval", who, request.reason, details)
    return {"approved": f"change plan v{plan.version}", "plan_digest": digest, "who": who, "record": record["seq"]}
