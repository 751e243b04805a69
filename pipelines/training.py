"""The training pipeline: its steps and the artifacts between them, its summary, and ``--if-changed``."""

import json
import logging

from mlflow.tracking import MlflowClient
from zenml import Model, pipeline
from zenml.enums import ExecutionMode

from pipelines import launch
from steps.datasets import build_datasets
from steps.evaluate import evaluate_model
from steps.ingest import ingest_from_s3, locate_archive, locate_sources
from steps.prepare import unzip_and_validate
from steps.profile import profile_reference
from steps.register import decide_promotion, load_gate_sets, quantize_int8, register_and_promote, score_candidates
from steps.tracking import mark_run_failed
from steps.train import train_model
from xray.config.pipeline import PipelineConfig
from xray.config.registry import MODEL_NAME
from xray.data.sites import changed_sources, identify_sources
from xray.registry import promotion, store
from xray.requests import TrainingRequest
from xray.storage import sources
from xray.storage.fetch import locate

logger = logging.getLogger(__name__)
MODEL = Model(
    name=MODEL_NAME,
    description="Pediatric chest X-ray NORMAL vs PNEUMONIA (ResNet50V2 by default; model.backbone).",
    license="CC BY 4.0 data (Kermany et al. 2018)",
    tags=["pneumonia", "chest-xray"],
)


# FAIL_FAST re-raises the failing step's own exception, so run.py can report it in one line.
@pipeline(name="chest_xray_training", model=MODEL, execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def training_pipeline(request: TrainingRequest) -> None:
    config = request.config  # the steps take its sections: a change in one reruns only the steps that use it
    identity = locate_archive(dataset_uri=request.dataset_uri, s3=config.s3, expected_sha256=config.expected_sha256)
    sources = locate_sources(data=config.data, s3=config.s3)
    raw_archive = ingest_from_s3(identity, s3=config.s3, expected_sha256=config.expected_sha256)
    dataset, data_report, _ = unzip_and_validate(
        raw_archive, data=config.data, seed=config.seed, s3=config.s3, source_identities=sources
    )
    spec = build_datasets(dataset, data=config.data, model=config.model, train=config.train, seed=config.seed)
    model, history, _ = train_model(dataset, spec, model=config.model, train=config.train)
    evaluate_and_register(model, dataset, spec, data_report, history, config)


def run_training(request: TrainingRequest) -> dict:
    """``train``: the run (or its schedule), or, with ``if_changed``, nothing when no source changed."""
    if request.if_changed:
        skipped = unchanged_since(request.config, request.dataset_uri)
        if skipped is not None:
            logger.info("--if-changed: %s", skipped["skipped"])
            return skipped
    return launch.train_like(training_pipeline, request, MODEL, lambda run, load: summarize(run, load, request.config))


def evaluate_and_register(model, dataset, spec, data_report, history, config: PipelineConfig) -> None:
    """Evaluation, the reference profile, the gate and registration: shared by training and tuning."""
    calibrated, evaluation, _ = evaluate_model(model, dataset, spec, evaluate=config.evaluate, seed=config.seed)
    profile = profile_reference(dataset, spec, evaluation, monitoring=config.monitoring, seed=config.seed)
    gate_sets, gate_site_images = load_gate_sets(dataset, spec, config=config)
    scores = score_candidates(calibrated, dataset, spec, gate_sets, gate_site_images, evaluation, config=config)
    decision = decide_promotion(scores, gate_sets, evaluation, data_report, spec, config=config)
    int8 = quantize_int8(calibrated, dataset, spec, evaluation, registry=config.registry, seed=config.seed)
    register_and_promote(calibrated, evaluation, decision, data_report, history, profile, int8, config=config)


SUMMARY_METRICS = (
    "test_auc",
    "test_accuracy",
    "test_sensitivity",
    "test_specificity",
    "test_accuracy_at_0_5",
    "test_sensitivity_at_0_5",
    "test_specificity_at_0_5",
    "test_ece",
    "test_brier",
    "val_auc",
)


def summarize(run, load, config: PipelineConfig) -> dict:
    """The summary line of a training run (a search's too), from its artifacts (pipelines.launch.run_outputs)."""
    registration = load("register_and_promote", "registration")
    report = load("unzip_and_validate", "data_report").to_dict()
    evaluation = load("evaluate_model", "evaluation").report
    flat = evaluation["flat"]
    return {
        "pipeline_run_id": str(run.id),
        "mlflow_run_id": registration.mlflow_run_id,
        "mlflow_tracking_uri": config.registry.tracking_uri,
        "model_name": registration.model_name,
        "model_version": registration.model_version,
        "promoted": registration.promoted,
        "pending_approval": registration.pending_approval,
        "promotion_reason": registration.reason,
        "threshold": registration.threshold,
        "seed": config.seed,
        "dataset_sha256": report["sites"][config.data.base_site]["digest"],
        "steps": {name: str(step.status.value) for name, step in run.steps.items()},
        "splits": report["counts"]
        | {"duplicates_removed": len(report["duplicates_removed"]), "quarantined": len(report["quarantined"])},
        "metrics": {k: flat[k] for k in SUMMARY_METRICS},
        "sites": site_summary(report, evaluation),
        "int8": load("quantize_int8", "int8").summary(),
    }


def site_summary(report: dict, evaluation: dict) -> dict:
    """``{site: {splits: {split: {class: count}}, source, digest, metrics: {...}, own_operating_point: {...}}}``: the
    test metrics (with CIs) of each site at the version's operating point, and at its own where it has one."""
    per_site = evaluation.get("sites") or {}
    sites = {}
    for site, entry in (report.get("sites") or {}).items():
        measured = per_site.get(site, {})
        sites[site] = {
            "source": entry.get("uri", ""),
            "digest": entry.get("digest", ""),
            "splits": entry.get("counts", {}),
            "metrics": measured.get("test") or {},
        }
        if measured.get("operating_point"):
            sites[site]["own_operating_point"] = {
                "threshold": measured["operating_point"]["threshold"],
                "metrics": measured.get("test_at_operating_point") or {},
            }
    return sites


def unchanged_since(config: PipelineConfig, dataset_uri: str | None) -> dict | None:
    """``--if-changed``: the skip summary when every source's content equals the champion's training data
    (xray.data.sites.changed_sources, on the identities the ingest steps locate too), None when something changed (or
    there is no champion, or it predates recorded training data)."""
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    champion, _ = store.current_champion(client, config.registry.model_name, config.registry.champion_alias)
    if champion is None:
        logger.info("--if-changed: no champion yet; training")
        return None
    recorded = json.loads(
        client.get_model_version(config.registry.model_name, champion).tags.get("training_data", "{}")
    )
    archive = locate(sources.resolve(dataset_uri or config.dataset_uri).uri, config.s3)
    digests, changed = changed_sources(
        archive, identify_sources(config.data, config.s3), config.data.base_site, recorded
    )
    if changed:
        why = "not recorded for that version" if not recorded.get("sites") else "changed: " + ", ".join(changed)
        logger.info("--if-changed: the sources differ from champion v%s's training data (%s); training", champion, why)
        return None
    return {
        "skipped": f"no new data since version {champion}",
        "model_name": config.registry.model_name,
        "model_version": champion,
        "training_data_digest": promotion.data_digest(digests),
        "sites": sorted(digests),
        "mlflow_tracking_uri": config.registry.tracking_uri,
    }
