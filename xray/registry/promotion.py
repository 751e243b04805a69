"""The way to champion, in the order the training pipeline's steps take it:

1. :func:`load_gate_sets`: the image sets the gate compares on (shares of the test split, labelled gate sites);
2. :func:`score_candidates`: the challenger's and the champion's probabilities on each, the champion through its own
   registered (and verified) folder;
3. :func:`xray.registry.gate.decide_on`: the rule, pure;
4. :func:`register_and_promote`: the version logged, registered and sealed with its card, and the alias moved under
   the promotion lock only if the gate passed and the champion did not change meanwhile (:func:`promote`).

The only module that uses both the rule (:mod:`xray.registry.gate`) and the registry's I/O
(:mod:`xray.registry.store`). Each step hands on a record (:class:`GateSets`, :class:`xray.registry.gate.Scores`,
:class:`xray.registry.gate.PromotionDecision`, :class:`Registration`), JSON-able, so ZenML stores and shows it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from xray import CLASS_NAMES
from xray.config.base import flatten
from xray.config.pipeline import PipelineConfig
from xray.config.scope import ScopeConfig
from xray.data.dataset import ValidatedDataset
from xray.data.inputs import labels_of, make_spec_for_inference, select
from xray.data.manifest import COLUMNS, subgroups_in
from xray.data.sites import load_site, site_name
from xray.errors import ConfigError
from xray.evaluation.recipes import Evaluation
from xray.model.network import predict_paths
from xray.registry import card, gate, store, tracking
from xray.registry.control import audit, impact
from xray.registry.control.plan import RECORD_TAG
from xray.serving import bundle
from xray.serving.runtimes import int8
from xray.serving.runtimes.int8 import Int8Outcome

logger = logging.getLogger(__name__)


@dataclass
class GateSets:
    """What the gate compares on: ``test_sets`` (name -> positions among the test split's rows: ``test``, each
    site's share ``test:<site>``, each large enough DICOM subgroup ``subgroup:<tag>=<value>``) and the labelled gate
    sites (``site:<name>`` -> their URI; their images are the step's other artifact, column ``gate_set``). Empty when
    there is no champion to compare with."""

    champion: str | None
    test_sets: dict[str, list[int]] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)
    site_counts: dict[str, dict] = field(default_factory=dict)
    champion_record: dict | None = None
    """The champion's change-control record (its ``change_control`` tag; None when it has none)."""


@dataclass
class Registration:
    """The registered version and what became of it (the summary's ``model_version``, ``promoted``, ...)."""

    model_name: str
    model_version: str
    model_uri: str
    mlflow_run_id: str
    promoted: bool
    pending_approval: bool
    reason: str
    threshold: float
    gate: dict[str, dict] = field(default_factory=dict)
    previous_champion: str | None = None
    impact_report: dict = field(default_factory=dict)
    """The version's impact report (xray.registry.control.impact), also in its run under ``impact/``."""


def subgroup_masks(test_rows, y: np.ndarray, min_per_class: int) -> dict[str, np.ndarray]:
    """``{"subgroup:<name>=<value>": mask}`` over the test split for each DICOM subgroup value with at least
    ``min_per_class`` images of each class (registry.gate_subgroups)."""
    return {
        f"subgroup:{name}={value}": mask
        for name, value, mask in subgroups_in(test_rows)
        if min((y[mask] == 0).sum(), (y[mask] == 1).sum()) >= min_per_class
    }


def load_gate_sets(client, dataset, spec, config: PipelineConfig, workdir: Path) -> tuple[GateSets, ValidatedDataset]:
    """The gate's image sets against the current champion (none: nothing to compare, nothing loaded): the test split,
    each site's share of it (when it holds more than one site: a version may not buy one site's gain with another's
    loss), with ``registry.gate_subgroups`` each DICOM subgroup large enough, and each labelled ``registry.gate_sites``
    entry, loaded through the site checks into ``workdir`` (returned as one dataset)."""
    registry = config.registry
    champion, _ = store.current_champion(client, registry.model_name, registry.champion_alias)
    images = ValidatedDataset(Path(workdir), pd.DataFrame(columns=[*COLUMNS, "gate_set"]))
    if champion is None:
        return GateSets(None), images
    record = client.get_model_version(registry.model_name, champion).tags.get(RECORD_TAG)
    test_rows = select(dataset.manifest, "test", spec)
    y = labels_of(test_rows)
    sets = {"test": np.arange(len(test_rows))}
    sites = test_rows["site"].to_numpy() if "site" in test_rows else np.array([])
    if len(set(sites)) > 1:
        for site in dict.fromkeys(sites):
            mask = sites == site
            if len(np.unique(y[mask])) < 2:
                logger.info("gate: test:%s has one class only; compared within the whole test split", site)
                continue
            sets[f"test:{site}"] = np.flatnonzero(mask)
    if registry.gate_subgroups:
        for name, mask in subgroup_masks(test_rows, y, registry.gate_subgroup_min_per_class).items():
            sets[name] = np.flatnonzero(mask)
    manifests, uris, counts = [], {}, {}
    for index, uri in enumerate(registry.gate_sites):
        site, report = load_site(uri, Path(workdir) / f"site-{index}", config.data, config.s3)
        name = f"site:{site_name(uri)}"
        prefix = site.root.relative_to(workdir)
        manifests.append(site.manifest.assign(path=[str(prefix / p) for p in site.manifest["path"]], gate_set=name))
        uris[name], counts[name] = uri, report["counts"]
        logger.info("gate site %s (%s): %s", name, uri, report["counts"])
    if manifests:
        images = ValidatedDataset(Path(workdir), pd.concat(manifests, ignore_index=True))
    tests = {k: v.tolist() for k, v in sets.items()}
    return GateSets(champion, tests, uris, counts, json.loads(record) if record else None), images


def score_candidates(model, dataset, spec, sets: GateSets, site_images, evaluation: Evaluation, config) -> gate.Scores:
    """Both models' probabilities on every gate set: the challenger's test probabilities from its evaluation, the gate
    sites scored here; the champion through its own registered folder (verified against its digest). A champion
    that cannot be loaded or scored is reported (never skipped): the gate then rejects. Not scored when the challenger
    fails the sensitivity floor anyway."""
    labels, challenger = {}, {}
    test_rows = select(dataset.manifest, "test", spec)
    y_test, p_test = labels_of(test_rows), evaluation.p_test
    paths = {}
    for name, positions in sets.test_sets.items():
        labels[name], challenger[name] = y_test[positions], p_test[positions]
        paths[name] = [dataset.paths(test_rows)[i] for i in positions]
    for name in sets.sites:
        rows = site_images.manifest[site_images.manifest["gate_set"] == name]
        paths[name], labels[name] = site_images.paths(rows), labels_of(rows)
        challenger[name] = predict_paths(model, paths[name], spec)
    scores = gate.Scores.of(sets.champion, labels, challenger)
    if sets.champion is None or not evaluation.flat["test_sensitivity"] >= config.evaluate.min_sensitivity:
        return scores
    try:
        predictor, _ = store.load_predictor(config.registry.model_name, sets.champion)
        champion_spec = make_spec_for_inference(predictor.image_size)
        scored = {name: predict_paths(predictor.model, files, champion_spec) for name, files in paths.items()}
    except Exception as error:  # noqa: BLE001 - whatever the cause, the gate must say it and not promote
        return replace(scores, champion_error=f"{type(error).__name__}: {error}".splitlines()[0][:500])
    return replace(scores, champion_probabilities={name: p.tolist() for name, p in scored.items()})


def record_decision(
    client, model_name: str, version_id: str, metrics: dict, decision: gate.PromotionDecision, waits: bool
) -> gate.PromotionDecision:
    """The version's test metrics and the gate's evidence as tags, before it is sealed (a sealed version's record is a
    reviewer's to change). ``waits`` (registry.require_approval): a version that passed waits for a person as
    ``approval=pending``. Returns the decision as recorded."""
    keys = ("test_auc", "test_sensitivity", "test_specificity", "test_accuracy", "test_ece", "threshold")
    store.set_version_tags(client, model_name, version_id, {key: str(metrics[key]) for key in keys if key in metrics})
    if decision.promoted and waits:
        decision = replace(
            decision,
            promoted=False,
            pending_approval=True,
            reason=f"passed the gate; pending approval (python3 run.py approve --model-version {version_id} "
            f"--reviewer NAME --reason TEXT). Gate: {decision.reason}",
        )
        store.set_version_tags(client, model_name, version_id, {store.APPROVAL_TAG: "pending"})
    elif decision.pending_approval:  # passed under a change plan a reviewer has yet to approve
        store.set_version_tags(client, model_name, version_id, {store.APPROVAL_TAG: "pending"})
    store.set_version_tags(client, model_name, version_id, gate.tags(decision))
    return decision


def move_aliases(
    client, model_name: str, version_id: str, alias: str, decision: gate.PromotionDecision, candidate_alias: str
) -> gate.PromotionDecision:
    """Once the version is sealed: a pending one becomes the candidate; a promoted one takes ``alias`` if the champion
    is still the one the gate compared against. Promotions are serialised by :func:`xray.registry.store.promotion_lock`;
    under it the alias moves only if the champion did not change (:func:`xray.registry.store.move_alias_if`). If
    another run moved it meanwhile, this version is not promoted (it was never compared with the new champion) and
    its tags say so. Returns the final decision."""
    if decision.pending_approval:
        client.set_registered_model_alias(model_name, candidate_alias, version_id)
    if not decision.promoted:
        return decision
    with tracking.refusals_as_errors(
        f"v{version_id} passed the gate, but MLflow refused to make it {alias}",
        ". On this tracking server a reviewer promotes: set registry.require_approval: true and approve with a "
        "reviewer's account",
    ):
        holder = store.move_alias_if(client, model_name, alias, version_id, decision.previous_champion)
    if holder == decision.previous_champion:
        return decision
    compared = f"v{decision.previous_champion}" if decision.previous_champion else "no champion"
    decision = replace(
        decision,
        promoted=False,
        reason=(
            f"the champion became v{holder} while this version was gated against {compared}; not promoted without a "
            f"paired comparison with v{holder} (train again, or compare by hand). Gate: {decision.reason}"
        ),
    )
    record = gate.tags(decision)
    changed = {key: record[key] for key in ("promotion_decision", "promotion_reason")}
    store.set_version_tags(client, model_name, version_id, changed)
    return decision


def promote(client, model_name: str, version_id: str, alias: str, metrics: dict, decision, candidate_alias=None):
    """:func:`record_decision` then :func:`move_aliases` (registration seals the version between the two)."""
    decision = record_decision(client, model_name, version_id, metrics, decision, candidate_alias is not None)
    return move_aliases(client, model_name, version_id, alias, decision, candidate_alias or "")


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


def version_metadata(evaluation: Evaluation, training: dict, reference_profile, scope, data_report: dict) -> dict:
    """What a registered version carries as MLflow model metadata and version tags: the operating point, the
    preprocessing a caller must reproduce, the data it was trained on, the OOD reference it is served with and the
    scope (DICOM header checks) it was validated for."""
    metrics = evaluation.report
    return {
        "threshold": evaluation.threshold,
        "threshold_policy": metrics["threshold_policy"],
        "image_size": training["image_size"],
        "preprocessing": training["preprocessing"],
        "input": "float32 RGB in [0, 255], shape (N, image_size, image_size, 3)",
        "classes": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[1],
        "dataset_sha256": training["dataset_sha256"],
        "ood_threshold": reference_profile.threshold,
        "val_ood_fraction": reference_profile.val_ood_fraction,
        "calibration": metrics.get("calibration", {}).get("method", "none"),
        "scope": (scope or ScopeConfig()).model_dump(mode="json"),
        "operating_points": operating_points(metrics),
        "training_data": training_data(data_report or {}),
        "training_data_digest": training_data(data_report or {})["digest"],
    }


SPLIT_SETTINGS = ("data.split.", "data.min_val_per_class", "data.val_fraction")
"""The data settings (as the prepare step logs them) that decide which images are val."""


def quantize_registered(client, version: str, dataset, data_report: dict, config: PipelineConfig):
    """On request, for a version registered without an int8 model (before int8, with ``registry.int8.enabled`` off,
    or one that failed): made as at registration (xray.serving.runtimes.int8.make, ``registry.int8``) on the split
    of the data it was trained on, which is checked first (its archive's digest, and the data settings and seed its
    run logged: another split could control on images it was trained on), then stored and sealed with it
    (:func:`xray.registry.store.add_int8`, a reviewer's right on a server with accounts). The outcome."""
    name = config.registry.model_name
    record = client.get_model_version(name, version)
    if record.tags.get("int8") == "passed":
        raise ConfigError(f"{name} v{version} already carries an int8 model that passed its val control")
    trained_on, digest = record.tags.get("dataset_sha256"), data_report["sites"][config.data.base_site]["digest"]
    if trained_on != digest:
        raise ConfigError(
            f"{name} v{version} was trained on archive {str(trained_on)[:12]}, not this one ({digest[:12]}): its int8 "
            "is controlled on the val split of the data it was trained on (--dataset-uri, the training's config)"
        )
    logged = client.get_run(record.run_id).data.params if record.run_id else {}
    settings = {key: str(value) for key, value in flatten({"data": config.data.model_dump(mode="json")}).items()}
    splitting = [key for key in settings if key.startswith(SPLIT_SETTINGS)]
    differ = sorted(key for key in splitting if key in logged and logged[key] != settings[key])
    if differ or ("seed" in logged and logged["seed"] != str(config.seed)):
        raise ConfigError(
            f"{name} v{version} was trained with other data settings ({', '.join(differ) or 'seed'}): its val split "
            "would differ; run with the config it was trained with"
        )
    predictor, _ = store.load_predictor(name, version)
    outcome = int8.make(
        predictor.model, dataset, predictor.image_size, predictor.threshold, config.registry.int8, config.seed
    )
    with tracking.refusals_as_errors(
        f"the int8 of {name} v{version} was made, but MLflow refused to store it with the sealed version",
        ": a sealed version's files change only under a reviewer's account",
    ):
        store.add_int8(client, name, version, outcome)
    return outcome


def register_and_promote(
    client,
    files: bundle.VersionFiles,
    evaluation: Evaluation,
    decision: gate.PromotionDecision,
    training: dict,
    data_report: dict,
    config: PipelineConfig,
) -> Registration:
    """Log and register the challenger as a new version with its card, seal its files (the Keras model, the reference
    profile, the int8 model where it passed its control), tag it, and move the champion alias only if the gate passed
    and the champion did not change meanwhile (:func:`promote`). Logs to the active MLflow run (its tags and the
    gate's metrics). ``training``: the card's model section (backbone, weights, epochs run, image size,
    preprocessing, class weights, counts, dataset_sha256)."""
    import mlflow  # lazy: MLflow's import costs seconds; the module's rules are used without it

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("registration logs to the active MLflow run: start one first")
    registry, scope = config.registry, config.scope
    reference_profile = files.reference_profile
    metadata = version_metadata(evaluation, training, reference_profile, scope, data_report)
    made = files.int8 or Int8Outcome.not_made()
    metadata["int8"] = made.state
    plan = config.change_plan
    section = gate.markdown(decision, plan.criteria.min_sensitivity if plan else config.evaluate.min_sensitivity)
    who = f"the promotion gate, run as {audit.account(registry.tracking_uri)}"
    link = f"runs:/{run.info.run_id}/{impact.FOLDER}/{impact.MARKDOWN_FILE}"
    if decision.change_control:
        section += impact.card_section(impact.report(decision, registry.model_name, "", who, run.info.run_id), link)
    about = {"mlflow_run_id": run.info.run_id, **training}
    about["int8"] = made.card_line()
    model_card = card.render(
        registry.model_name,
        evaluation.report,
        training["counts"],
        data_report,
        about,
        reference_profile,
        section,
        scope,
    )
    # The version is created with its metadata as tags. record_decision() records the threshold with the test
    # metrics: a version's tags are written once.
    tags = {key: json.dumps(value) if isinstance(value, dict) else str(value) for key, value in metadata.items()}
    if decision.change_control:
        tags[RECORD_TAG] = json.dumps(decision.change_control["record"], separators=(",", ":"))
    created_with = {key: value for key, value in tags.items() if key != "threshold"}
    uri, version = store.log_and_register(files, registry.model_name, metadata, model_card, created_with)
    store.stamp_version(client, registry.model_name, version)
    waits = registry.require_approval
    decision = record_decision(client, registry.model_name, version, evaluation.flat, decision, waits)
    # The folder and its record are complete: its digest goes into the card and a tag (every load checks it), and
    # the version is sealed. One card, in one place: the version's logged model; the run links to it, the registry
    # shows it.
    store.seal(client, registry.model_name, version, model_card)
    decision = move_aliases(
        client, registry.model_name, version, registry.champion_alias, decision, registry.candidate_alias
    )
    record = gate.tags(decision)
    report = impact.report(decision, registry.model_name, version, who, run.info.run_id)
    if decision.change_control:
        mlflow.log_dict(report, f"{impact.FOLDER}/{impact.JSON_FILE}")
        mlflow.log_text(impact.markdown(report), f"{impact.FOLDER}/{impact.MARKDOWN_FILE}")
        mlflow.set_tag("impact_report", link)
    mlflow.set_tags(
        {
            "model_version": version,
            "model_card": store.card_uri(registry.model_name, version),
            "promotion_decision": record["promotion_decision"],
            "promotion_reason": decision.reason[:4900],
        }
    )
    for name, comparison in decision.comparisons.items():
        prefix = f"gate_{name.replace(':', '_')}_"
        mlflow.log_metrics({prefix + key: value for key, value in comparison.items() if isinstance(value, float)})
    verdict = f"promoted to {registry.champion_alias}" if decision.promoted else "not promoted"
    logger.info("registered %s v%s: %s (%s)", registry.model_name, version, verdict, decision.reason)
    return Registration(
        **{k: v for k, v in asdict(decision).items() if k in ("promoted", "pending_approval", "reason")},
        model_name=registry.model_name,
        model_version=version,
        model_uri=uri,
        mlflow_run_id=run.info.run_id,
        threshold=evaluation.threshold,
        gate=decision.comparisons,
        previous_champion=decision.previous_champion,
        impact_report=report if decision.change_control else {},
    )
