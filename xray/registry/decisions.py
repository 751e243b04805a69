"""A person's decisions on a registered version (registry.require_approval): approve a candidate, reject it, roll the
champion back, apply a site's proposed operating point. Each is recorded with who, when and why (the version's
``history.*`` tag and its card's History); on a tracking server with accounts only a reviewer's account may make
them (infra/mlflow_auth.py)."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone

from requests import HTTPError

from xray.errors import ConfigError
from xray.registry import card, store, tracking
from xray.registry.control.plan import RECORD_TAG

APPROVAL_TAG = store.APPROVAL_TAG


def _action(action: str, by: str, why: str) -> dict:
    if not by.strip() or not why.strip():
        raise ConfigError(f"{action} needs --reviewer and --reason (who decides, and why, go on the record)")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # a tag key takes no colons: history.<digits>
    return {"action": action, "by": by.strip()[:200], "why": why.strip()[:2000], "at": stamp}


def _version(client, registry, version: str):
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds

    try:
        return client.get_model_version(registry.model_name, version)
    except MlflowException:
        raise ConfigError(f"no version {version} of {registry.model_name} in the registry") from None


def _signed_off(client, registry, version: str, tags: dict, description: str) -> None:
    """What a reviewer signs off is the exact files registered: the version has its digest, the same one its card
    (the description, which only a reviewer may rewrite) recorded at registration, and its files match it."""
    digest = tags.get(store.DIGEST_TAG)
    if not digest or f"`{digest}`" not in (description or ""):
        raise ConfigError(
            f"v{version} has no digest recorded at registration (registered before digests, or its record was "
            "altered): its files cannot be signed off; register it again"
        )
    info = store.resolve_version(registry.model_name, version)
    with tempfile.TemporaryDirectory(prefix="xray-signoff-") as folder:
        store.download_verified(info, "", folder)
    store.verified_card(client, registry.model_name, version)  # its History gets the decision: checked before


def _plan_approved(client, registry, version: str, tags: dict, champion: str | None, approved_plans) -> None:
    """A version gated under a change plan other than the champion's becomes champion only once a reviewer approved
    that plan (its digest among ``approved_plans``, the audit trail's plan approvals)."""
    mine = json.loads(tags.get(RECORD_TAG) or "{}").get("plan_digest")
    if mine is None or champion is None or mine in approved_plans:
        return
    theirs = json.loads(_version(client, registry, champion).tags.get(RECORD_TAG) or "{}").get("plan_digest")
    if theirs != mine:
        plan = json.loads(tags[RECORD_TAG]).get("plan_version")
        raise ConfigError(
            f"v{version} was gated under change plan v{plan} ({mine[:12]}), which is not champion v{champion}'s and "
            "no reviewer has approved: approve the plan first (python3 run.py audit approve-plan --config CONFIG "
            "--reason TEXT, the reviewer account)"
        )


def approve(client, registry, version: str, reviewer: str, reason: str, approved_plans=frozenset()) -> dict:
    """A pending candidate becomes champion, under the promotion lock, if the champion is still the one its gate
    compared it with (the gate's precondition) and its change plan is in force (:func:`_plan_approved`); otherwise
    nothing moves and the error says why."""
    action = _action("approved", reviewer, reason)
    with store.promotion_lock(client, registry.model_name):
        found = _version(client, registry, version)
        tags = found.tags
        if tags.get(APPROVAL_TAG) != "pending":
            raise ConfigError(
                f"v{version} is not pending approval (approval: {tags.get(APPROVAL_TAG, 'none')}, gate: "
                f"{tags.get('promotion_decision', 'none')}); only a version that passed the gate can be approved"
            )
        _signed_off(client, registry, version, tags, found.description)
        champion = store.alias_holder(client, registry.model_name, registry.champion_alias)
        gated_against = tags.get("gate.champion_version", "none")
        if (champion or "none") != gated_against:
            raise ConfigError(
                f"v{version} was gated against {'no champion' if gated_against == 'none' else 'v' + gated_against}, "
                f"but the champion is now {'none' if champion is None else 'v' + champion}: not approved without a "
                "paired comparison with it (train again)"
            )
        _plan_approved(client, registry, version, tags, champion, approved_plans)
        client.set_registered_model_alias(registry.model_name, registry.champion_alias, version)
        if store.alias_holder(client, registry.model_name, registry.candidate_alias) == version:
            client.delete_registered_model_alias(registry.model_name, registry.candidate_alias)
        store.set_version_tags(client, registry.model_name, version, {APPROVAL_TAG: "approved"})
    action["why"] = f"{action['why']} (champion was {'none' if champion is None else 'v' + champion})"
    store.add_history(client, registry.model_name, version, action)
    return {"action": "approved", "model_version": version, "previous_champion": champion, **action}


def reject(client, registry, version: str, reviewer: str, reason: str) -> dict:
    """A pending candidate is turned down: it keeps its registration and tags, never the champion alias."""
    action = _action("rejected", reviewer, reason)
    with store.promotion_lock(client, registry.model_name):
        tags = _version(client, registry, version).tags
        if tags.get(APPROVAL_TAG) != "pending":
            raise ConfigError(f"v{version} is not pending approval (approval: {tags.get(APPROVAL_TAG, 'none')})")
        store.verified_card(client, registry.model_name, version)  # its History gets the decision: checked before
        if store.alias_holder(client, registry.model_name, registry.candidate_alias) == version:
            client.delete_registered_model_alias(registry.model_name, registry.candidate_alias)
        store.set_version_tags(client, registry.model_name, version, {APPROVAL_TAG: "rejected"})
    store.add_history(client, registry.model_name, version, action)
    return {"action": "rejected", "model_version": version, **action}


def rollback(client, registry, to: str, reviewer: str, reason: str) -> dict:
    """The champion alias back to an earlier version that was champion once (promoted by the gate or approved)."""
    action = _action(f"rollback to v{to}", reviewer, reason)
    with store.promotion_lock(client, registry.model_name):
        found = _version(client, registry, to)
        tags = found.tags
        # Evidence only a reviewer can write on a server with accounts: an approval or a rollback in the version's
        # history, or the gate's "promoted" (an EDIT account may record only pending_approval or rejected).
        records = [json.loads(v) for k, v in tags.items() if k.startswith("history.")]
        champion_once = any(r.get("action", "").startswith(("approved", "rollback to")) for r in records)
        if not champion_once and tags.get("promotion_decision") != "promoted":
            raise ConfigError(
                f"v{to} was never champion (gate: {tags.get('promotion_decision', 'none')}): not rolled back"
            )
        _signed_off(client, registry, to, tags, found.description)
        champion = store.alias_holder(client, registry.model_name, registry.champion_alias)
        if champion == to:
            raise ConfigError(f"v{to} is already the champion")
        client.set_registered_model_alias(registry.model_name, registry.champion_alias, to)
    action["why"] = f"{action['why']} (champion was {'none' if champion is None else 'v' + champion})"
    store.add_history(client, registry.model_name, to, action)
    if champion is not None:
        store.add_history(client, registry.model_name, champion, action | {"action": f"replaced as champion by v{to}"})
    return {"action": "rolled back", "model_version": to, "previous_champion": champion, **action}


def apply_operating_point(client, registry, version: str, proposal: str, reviewer: str, reason: str) -> dict:
    """A site's operating point that its evaluation proposed becomes the version's for that site: stored, the version
    sealed again, the card and its history say who and why. ``proposal``: ``SITE:ID``, the ID the evaluation printed
    (:func:`xray.registry.card.proposal_id`), so what is applied is exactly what the reviewer looked at."""
    site, _, wanted = proposal.partition(":")
    action = _action(f"operating point for site {site} applied", reviewer, reason)
    tags = _version(client, registry, version).tags
    try:
        recalibrated = json.loads(tags.get(f"{card.SITE_TAG}{site}", "{}")).get("recalibrated") or {}
    except (ValueError, AttributeError):
        recalibrated = {}
    point = recalibrated.get("operating_point")
    if not point or not recalibrated.get("meets_policy"):
        raise ConfigError(
            f"v{version} has no proposed operating point for site {site} (run --pipeline evaluation --model-version "
            f"{version} --site {site} --recalibrate-fraction F; it proposes one when the re-fitted point meets the "
            "threshold policy)"
        )
    if card.proposal_id(point) != wanted:
        raise ConfigError(
            f"v{version}'s proposed operating point for site {site} is {card.proposal_id(point)}, not {wanted or '(none)'}"
            f": apply the proposal you reviewed as --operating-point {site}:<id> (the evaluation's summary names it)"
        )
    store.save_operating_point(client, registry.model_name, version, site, point)
    action["why"] = f"{action['why']} (threshold {float(point['threshold']):.4f}, {point['fitted_on']})"
    store.add_history(client, registry.model_name, version, action)
    return {"model_version": version, "site": site, "operating_point": point, **action}


MANAGE_NEEDED = "changing a sealed version needs MANAGE on the model, which this run's MLflow account lacks"


def record_site_evaluation(client, model_name: str, version: str, site: str, result: dict, run_id: str) -> dict:
    """What a site evaluation leaves on the version: its measurements (the tag ``site.<site>``, anyone's to write),
    a re-fitted operating point that meets the policy (stored, or, where the run's account may not change a sealed
    version, proposed with its ID for a reviewer: ``approve --operating-point SITE:ID``), and the card's site table.
    Returns what became of the operating point and the card (the summary's ``operating_point``, ``model_card``)."""
    recalibrated, done = result.get("recalibrated"), {}
    if recalibrated is not None and recalibrated["meets_policy"]:
        counts = recalibrated.get("calibration_counts") or {}
        recalibrated["operating_point"] = {
            "calibration": recalibrated["calibration"],
            "calibration_covariance": recalibrated.get("calibration_covariance"),
            "prevalence": counts.get("PNEUMONIA", 0) / max(1, sum(counts.values())) if counts else None,
            "threshold": recalibrated["metrics"]["threshold"],
            "threshold_policy": recalibrated["threshold_policy"],
            "fitted_on": f"{recalibrated['calibration_images']} images of the site (--recalibrate-fraction "
            f"{recalibrated['fraction']:g}, run {run_id})",
        }
    store.record_site_result(client, model_name, version, site, result["metrics"], run_id, recalibrated)
    if recalibrated is not None and recalibrated["meets_policy"]:
        point = recalibrated["operating_point"]
        proposal = f"--operating-point {site}:{card.proposal_id(point)}"
        stored = _unless_refused(lambda: store.save_operating_point(client, model_name, version, site, point))
        done["operating_point"] = (
            f"stored: --site {site} now uses it in batch inference and serving"
            if stored
            else f"proposed, not stored ({MANAGE_NEEDED}); a reviewer applies it: python3 run.py approve "
            f"--model-version {version} {proposal} --reason TEXT"
        )
    elif recalibrated is not None:
        done["operating_point"] = "not stored: " + recalibrated["policy"]
    if not _unless_refused(lambda: store.update_model_card(client, model_name, version)):
        done["model_card"] = f"not updated ({MANAGE_NEEDED}): the site's row is in the tag site.{site}"
    return done


def _unless_refused(write) -> bool:
    """Run ``write``; False where the tracking server refused it for want of permission (anything else raises)."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds

    try:
        write()
    except (MlflowException, HTTPError) as error:
        if tracking.refusal(error) is None:
            raise
        return False
    return True
