"""The way to champion: score the champion on the challenger's images, decide by the gate's rule, register the
version with its card, and move the alias under the promotion lock. The only module that uses both the rule
(:mod:`xray.registry.gate`) and the registry's I/O (:mod:`xray.registry.store`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from xray import CLASS_NAMES
from xray.config import ScopeConfig
from xray.data.inputs import labels_of, make_spec_for_inference, select
from xray.data.manifest import subgroups_in
from xray.data.sites import load_site, site_name
from xray.errors import ConfigError
from xray.model.network import predict_paths
from xray.registry import card, flavor, gate, store, tracking

logger = logging.getLogger(__name__)


def score_champion(model_name: str, champion_version: str, image_sets: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """The champion's probabilities on each set of image files, through the champion's own registered folder."""
    predictor, _ = store.load_predictor(model_name, champion_version)
    spec = make_spec_for_inference(predictor.image_size)
    return {name: predict_paths(predictor.model, paths, spec) for name, paths in image_sets.items()}


def gate_against_champion(
    model_name: str,
    champion_version: str | None,
    image_sets: dict[str, list[str]],
    labels: dict[str, np.ndarray],
    challenger: dict[str, np.ndarray],
    test_sensitivity: float,
    min_sensitivity: float,
    margin: float,
    samples: int,
    seed: int,
) -> gate.PromotionDecision:
    """Score the champion on the challenger's image sets, compare pairwise, decide (:func:`xray.registry.gate.decide`).

    A champion that cannot be loaded or scored is reported in the decision (never skipped): the gate then rejects.
    """
    comparisons: dict[str, dict] = {}
    champion_error = None
    if champion_version is not None and test_sensitivity >= min_sensitivity:
        try:
            champion = score_champion(model_name, champion_version, image_sets)
        except Exception as error:  # noqa: BLE001 - whatever the cause, the gate must say it and not promote
            champion_error = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        else:
            comparisons = {
                name: gate.compare(labels[name], challenger[name], champion[name], samples, seed) for name in image_sets
            }
    return gate.decide(test_sensitivity, min_sensitivity, champion_version, comparisons, margin, champion_error)


def subgroup_masks(test_rows, y: np.ndarray, min_per_class: int) -> dict[str, np.ndarray]:
    """``{"subgroup:<name>=<value>": mask}`` over the test split for each DICOM subgroup value with at least
    ``min_per_class`` images of each class (registry.gate_subgroups)."""
    return {
        f"subgroup:{name}={value}": mask
        for name, value, mask in subgroups_in(test_rows)
        if min((y[mask] == 0).sum(), (y[mask] == 1).sum()) >= min_per_class
    }


def image_sets(
    model, dataset, spec, test_probabilities: np.ndarray, gate_sites, data, s3, workdir, gate_subgroups: int = 0
):
    """(paths, labels, challenger probabilities) per image set: the test split, already scored by the challenger,
    each site's part of it (``test:<site>``, when the test split holds more than one site), with ``gate_subgroups``
    (a minimum per class) each DICOM subgroup large enough (:func:`subgroup_masks`), and each labelled gate site (loaded through the site checks into a folder of ``workdir``, and scored here).
    The sites' paths point into ``workdir``: the caller keeps it until the champion has scored them too."""
    test_rows = select(dataset.manifest, "test", spec)
    paths, labels, challenger = (
        {"test": dataset.paths(test_rows)},
        {"test": labels_of(test_rows)},
        {"test": test_probabilities},
    )
    sites = test_rows["site"].to_numpy() if "site" in test_rows else np.array([])
    if len(set(sites)) > 1:
        # Every site's own test split too: a version may not buy one site's gain with another's loss.
        for site in dict.fromkeys(sites):
            mask = sites == site
            if len(np.unique(labels["test"][mask])) < 2:
                logger.info("gate: test:%s has one class only; compared within the whole test split", site)
                continue
            name = f"test:{site}"
            paths[name] = [path for path, keep in zip(paths["test"], mask) if keep]
            labels[name], challenger[name] = labels["test"][mask], np.asarray(test_probabilities)[mask]
    if gate_subgroups:
        for name, mask in subgroup_masks(test_rows, labels["test"], gate_subgroups).items():
            paths[name] = [path for path, keep in zip(paths["test"], mask) if keep]
            labels[name], challenger[name] = labels["test"][mask], np.asarray(test_probabilities)[mask]
    for index, uri in enumerate(gate_sites):
        site, report = load_site(uri, Path(workdir) / f"site-{index}", data, s3)
        name = f"site:{site_name(uri)}"
        paths[name], labels[name] = site.paths(site.manifest), labels_of(site.manifest)
        challenger[name] = predict_paths(model, paths[name], spec)
        logger.info("gate site %s (%s): %s", name, uri, report["counts"])
    return paths, labels, challenger


def promote(
    client,
    model_name: str,
    version_id: str,
    alias: str,
    metrics: dict,
    decision: gate.PromotionDecision,
    candidate_alias: str | None = None,
) -> gate.PromotionDecision:
    """Tag the version with its metrics and the gate's evidence; give it the alias when the gate promoted it.
    Returns the final decision.

    ``decision`` was taken against the champion read before scoring. Promotions are serialised by
    :func:`xray.registry.store.promotion_lock`; under it the alias moves only if the champion is still the one the
    gate compared against (:func:`xray.registry.store.move_alias_if`). If another run moved it meanwhile, this
    version is not promoted (it was never compared with the new champion) and its tags say so.
    """
    keys = ("test_auc", "test_sensitivity", "test_specificity", "test_accuracy", "test_ece", "threshold")
    store.set_version_tags(client, model_name, version_id, {key: str(metrics[key]) for key in keys if key in metrics})
    if decision.promoted and candidate_alias:
        # registry.require_approval: the champion stays; the version waits as the candidate for a person's approval
        # (pending first: on a server with accounts only a pending version may become the candidate).
        store.set_version_tags(client, model_name, version_id, {APPROVAL_TAG: "pending"})
        client.set_registered_model_alias(model_name, candidate_alias, version_id)
        decision = replace(
            decision,
            promoted=False,
            pending_approval=True,
            reason=f"passed the gate; pending approval (python run.py approve --model-version {version_id} "
            f"--reviewer NAME --reason TEXT). Gate: {decision.reason}",
        )
    if decision.promoted:
        with tracking.refusals_as_errors(
            f"v{version_id} passed the gate, but MLflow refused to make it {alias}",
            ". On this tracking server a reviewer promotes: set registry.require_approval: true and approve with a "
            "reviewer's account",
        ):
            holder = store.move_alias_if(client, model_name, alias, version_id, decision.previous_champion)
        if holder != decision.previous_champion:
            compared = f"v{decision.previous_champion}" if decision.previous_champion else "no champion"
            decision = replace(
                decision,
                promoted=False,
                reason=(
                    f"the champion became v{holder} while this version was gated against {compared}; not promoted "
                    f"without a paired comparison with v{holder} (train again, or compare by hand). Gate: "
                    f"{decision.reason}"
                ),
            )
    store.set_version_tags(client, model_name, version_id, gate.tags(decision))
    return decision


def training_data(data_report: dict) -> dict:
    """{site: content digest} of the sources a version was trained on, and their one digest (``--if-changed``)."""
    entries = (data_report.get("sites") or {}).items()
    sites = {site: entry.get("digest", "") for site, entry in entries}
    # An S3 object's ETag beside its SHA-256: --if-changed can then tell an unchanged object by a HEAD alone.
    etags = {site: entry["etag"] for site, entry in entries if entry.get("etag")}
    return {"sites": sites, "digest": data_digest(sites), "etags": etags}


def data_digest(sites: dict[str, str]) -> str:
    """One digest of the training sources: equal when every site's content digest is."""
    return hashlib.sha256(json.dumps(dict(sorted(sites.items()))).encode()).hexdigest()


def operating_points(metrics: dict) -> dict:
    """{site: its own calibration and threshold} from the evaluation's per-site results (sites with enough val)."""
    return {
        site: entry["operating_point"]
        for site, entry in (metrics.get("sites") or {}).items()
        if entry["operating_point"]
    }


def version_metadata(
    metrics: dict,
    threshold: float,
    spec,
    dataset_sha256: str,
    reference_profile,
    scope: ScopeConfig | None = None,
    data_report: dict | None = None,
) -> dict:
    """What a registered version carries as MLflow model metadata and version tags: the operating point, the
    preprocessing a caller must reproduce, the data it was trained on, the OOD reference it is served with and the
    scope (DICOM header checks) it was validated for."""
    return {
        "threshold": threshold,
        "threshold_policy": metrics["threshold_policy"],
        "image_size": spec.image_size,
        "preprocessing": spec.preprocessing,
        "input": "float32 RGB in [0, 255], shape (N, image_size, image_size, 3)",
        "classes": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[1],
        "dataset_sha256": dataset_sha256,
        "ood_threshold": reference_profile.threshold,
        "val_ood_fraction": reference_profile.val_ood_fraction,
        "calibration": metrics.get("calibration", {}).get("method", "none"),
        "scope": (scope or ScopeConfig()).model_dump(mode="json"),
        "operating_points": operating_points(metrics),
        "training_data": training_data(data_report or {}),
        "training_data_digest": training_data(data_report or {})["digest"],
    }


def register_candidate(
    client,
    model,
    *,
    metrics: dict,
    threshold: float,
    test_probabilities: np.ndarray,
    dataset,
    spec,
    dataset_sha256: str,
    data_report: dict,
    training: dict,
    reference_profile,
    registry,
    evaluate,
    data,
    s3,
    seed: int,
    scope: ScopeConfig | None = None,
) -> dict:
    """The training pipeline's registration: gate the trained model against the champion (paired scores on test
    and the gate sites), log and register it as a new version with its card, and move the champion alias only if
    the gate passed and the champion did not change meanwhile (:func:`promote`).

    Logs to the active MLflow run (its tags and gate metrics). ``training`` is the card's model section (backbone,
    weights, epochs run, class weights). Returns the registration: name, version, URI, run id, decision and reason.
    """
    import mlflow  # lazy: MLflow's import costs seconds; the module's rules are used without it

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_candidate logs to the active MLflow run: start one first")
    flat = metrics["flat"]
    scope = scope or ScopeConfig()
    metadata = version_metadata(metrics, threshold, spec, dataset_sha256, reference_profile, scope, data_report)
    champion, _ = store.current_champion(client, registry.model_name, registry.champion_alias)
    # The gate sites' images live in this folder until the champion has scored them.
    with tempfile.TemporaryDirectory(prefix="xray-gate-sites-") as workdir:
        subgroups = registry.gate_subgroup_min_per_class if registry.gate_subgroups else 0
        sets = (model, dataset, spec, test_probabilities, registry.gate_sites, data, s3, workdir, subgroups)
        paths, labels, challenger = image_sets(*sets) if champion is not None else ({}, {}, {})
        rule = (flat["test_sensitivity"], evaluate.min_sensitivity, registry.margin, evaluate.bootstrap_samples, seed)
        decision = gate_against_champion(registry.model_name, champion, paths, labels, challenger, *rule)
    model_card = card.render(
        registry.model_name,
        metrics,
        spec.counts,
        data_report,
        {
            "mlflow_run_id": run.info.run_id,
            **training,
            "image_size": spec.image_size,
            "preprocessing": spec.preprocessing,
            "class_weights": spec.class_weights,
            "dataset_sha256": dataset_sha256,
        },
        reference_profile,
        gate.markdown(decision, evaluate.min_sensitivity),
        scope,
    )
    uri, version = flavor.log_and_register(model, registry.model_name, metadata, model_card, reference_profile)
    flavor.stamp_version(client, registry.model_name, version)
    # The folder is complete: its digest goes into the card and a tag (every load checks it). One card, in one
    # place: the version's logged model. The run links to it; the registry shows it.
    store.seal(client, registry.model_name, version, model_card)
    store.set_version_tags(
        client,
        registry.model_name,
        version,
        {
            key: json.dumps(value) if isinstance(value, dict) else str(value)
            for key, value in metadata.items()
            if key != "threshold"  # promote() records it with the test metrics: a version's tags are written once
        },
    )
    decision = promote(
        client,
        registry.model_name,
        version,
        registry.champion_alias,
        flat,
        decision,
        registry.candidate_alias if registry.require_approval else None,
    )
    mlflow.set_tags(
        {
            "model_version": version,
            "model_card": store.card_uri(registry.model_name, version),
            "promotion_decision": gate.tags(decision)["promotion_decision"],
            "promotion_reason": decision.reason[:4900],
        }
    )
    for name, comparison in decision.comparisons.items():
        mlflow.log_metrics(
            {
                f"gate_{name.replace(':', '_')}_{key}": value
                for key, value in comparison.items()
                if isinstance(value, float)
            }
        )
    logger.info(
        "registered %s v%s: %s (%s)",
        registry.model_name,
        version,
        f"promoted to {registry.champion_alias}" if decision.promoted else "not promoted",
        decision.reason,
    )
    return {
        "model_name": registry.model_name,
        "model_version": version,
        "model_uri": uri,
        "mlflow_run_id": run.info.run_id,
        "promoted": decision.promoted,
        "pending_approval": decision.pending_approval,
        "reason": decision.reason,
        "threshold": threshold,
        "gate": decision.comparisons,
        "previous_champion": champion,
    }


# -- a person's decisions: approve, reject, roll back (registry.require_approval) -----------------------------------

APPROVAL_TAG = "approval"


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


def approve(client, registry, version: str, reviewer: str, reason: str) -> dict:
    """A pending candidate becomes champion, under the promotion lock, if the champion is still the one its gate
    compared it with (the gate's precondition); otherwise nothing moves and the error says why."""
    action = _action("approved", reviewer, reason)
    with store.promotion_lock(client, registry.model_name):
        tags = _version(client, registry, version).tags
        if tags.get(APPROVAL_TAG) != "pending":
            raise ConfigError(
                f"v{version} is not pending approval (approval: {tags.get(APPROVAL_TAG, 'none')}, gate: "
                f"{tags.get('promotion_decision', 'none')}); only a version that passed the gate can be approved"
            )
        champion = store.alias_holder(client, registry.model_name, registry.champion_alias)
        gated_against = tags.get("gate.champion_version", "none")
        if (champion or "none") != gated_against:
            raise ConfigError(
                f"v{version} was gated against {'no champion' if gated_against == 'none' else 'v' + gated_against}, "
                f"but the champion is now {'none' if champion is None else 'v' + champion}: not approved without a "
                "paired comparison with it (train again)"
            )
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
        if store.alias_holder(client, registry.model_name, registry.candidate_alias) == version:
            client.delete_registered_model_alias(registry.model_name, registry.candidate_alias)
        store.set_version_tags(client, registry.model_name, version, {APPROVAL_TAG: "rejected"})
    store.add_history(client, registry.model_name, version, action)
    return {"action": "rejected", "model_version": version, **action}


def rollback(client, registry, to: str, reviewer: str, reason: str) -> dict:
    """The champion alias back to an earlier version that was champion once (promoted by the gate or approved)."""
    action = _action(f"rollback to v{to}", reviewer, reason)
    with store.promotion_lock(client, registry.model_name):
        tags = _version(client, registry, to).tags
        if tags.get("promotion_decision") != "promoted" and tags.get(APPROVAL_TAG) != "approved":
            raise ConfigError(
                f"v{to} was never champion (gate: {tags.get('promotion_decision', 'none')}): not rolled back"
            )
        champion = store.alias_holder(client, registry.model_name, registry.champion_alias)
        if champion == to:
            raise ConfigError(f"v{to} is already the champion")
        client.set_registered_model_alias(registry.model_name, registry.champion_alias, to)
    action["why"] = f"{action['why']} (champion was {'none' if champion is None else 'v' + champion})"
    store.add_history(client, registry.model_name, to, action)
    if champion is not None:
        store.add_history(client, registry.model_name, champion, action | {"action": f"replaced as champion by v{to}"})
    return {"action": "rolled back", "model_version": to, "previous_champion": champion, **action}


def apply_operating_point(client, registry, version: str, site: str, reviewer: str, reason: str) -> dict:
    """A site's operating point that its evaluation proposed (``site.<site>`` tag, re-fitted and meeting the policy)
    becomes the version's for that site: stored, the version sealed again, the card and its history say who and why."""
    action = _action(f"operating point for site {site} applied", reviewer, reason)
    tags = _version(client, registry, version).tags
    recalibrated = json.loads(tags.get(f"{card.SITE_TAG}{site}", "{}")).get("recalibrated") or {}
    point = recalibrated.get("operating_point")
    if not point or not recalibrated.get("meets_policy"):
        raise ConfigError(
            f"v{version} has no proposed operating point for site {site} (run --pipeline evaluation --model-version "
            f"{version} --site {site} --recalibrate-fraction F; it proposes one when the re-fitted point meets the "
            "threshold policy)"
        )
    store.save_operating_point(client, registry.model_name, version, site, point)
    action["why"] = f"{action['why']} (threshold {float(point['threshold']):.4f}, {point['fitted_on']})"
    store.add_history(client, registry.model_name, version, action)
    return {
        "action": "operating point applied",
        "model_version": version,
        "site": site,
        "operating_point": point,
        **action,
    }
