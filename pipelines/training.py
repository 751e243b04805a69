"""Wiring only: the eight training steps and the artifacts between them."""

from zenml import Model, pipeline
from zenml.enums import ExecutionMode

from steps import (
    build_datasets,
    evaluate_model,
    ingest_from_s3,
    locate_archive,
    locate_sources,
    profile_reference,
    register_model,
    train_model,
    unzip_and_validate,
)
from steps.tracking import mark_run_failed
from xray.config import MODEL_NAME, PipelineConfig

MODEL = Model(
    name=MODEL_NAME,
    description="Pediatric chest X-ray NORMAL vs PNEUMONIA (ResNet50V2 by default; model.backbone).",
    license="CC BY 4.0 data (Kermany et al. 2018)",
    tags=["pneumonia", "chest-xray"],
)


# FAIL_FAST re-raises the failing step's own exception, so run.py can report it in one line.
@pipeline(name="chest_xray_training", model=MODEL, execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def training_pipeline(config: PipelineConfig, dataset_uri: str) -> None:
    identity = locate_archive(dataset_uri=dataset_uri, s3=config.s3, expected_sha256=config.expected_sha256)
    sources = locate_sources(data=config.data, s3=config.s3)
    raw_archive, archive_info = ingest_from_s3(identity, s3=config.s3, expected_sha256=config.expected_sha256)
    dataset, _, data_report, _, _ = unzip_and_validate(
        raw_archive, data=config.data, seed=config.seed, s3=config.s3, source_identities=sources
    )
    spec = build_datasets(dataset, data=config.data, model=config.model, train=config.train, seed=config.seed)
    model, history, _ = train_model(dataset, spec, model=config.model, train=config.train)
    evaluate_and_register(model, dataset, spec, archive_info, data_report, history, config, config.model)


def evaluate_and_register(model, dataset, spec, archive_info, data_report, history, config, model_config) -> None:
    """Evaluation, the reference profile and registration behind the gate: shared by training and tuning."""
    calibrated, metrics, threshold, _, _, _, _, val_probabilities, test_probabilities = evaluate_model(
        model, dataset, spec, evaluate=config.evaluate, seed=config.seed
    )
    profile = profile_reference(
        dataset,
        spec,
        threshold,
        val_probabilities,
        monitoring=config.monitoring,
        seed=config.seed,
    )
    register_model(
        calibrated,
        metrics,
        threshold,
        test_probabilities,
        dataset,
        spec,
        archive_info,
        data_report,
        history,
        profile,
        model_config=model_config,
        registry=config.registry,
        evaluate=config.evaluate,
        data=config.data,
        s3=config.s3,
        seed=config.seed,
        scope=config.scope,
    )


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
    registration = load("register_model", "registration")
    report = load("unzip_and_validate", "data_report")
    evaluation = load("evaluate_model", "metrics")
    flat = evaluation["flat"]
    return {
        "pipeline_run_id": str(run.id),
        "mlflow_run_id": registration["mlflow_run_id"],
        "mlflow_tracking_uri": config.registry.tracking_uri,
        "model_name": registration["model_name"],
        "model_version": registration["model_version"],
        "promoted": registration["promoted"],
        "pending_approval": registration.get("pending_approval", False),
        "promotion_reason": registration["reason"],
        "threshold": registration["threshold"],
        "seed": config.seed,
        "dataset_sha256": load("ingest_from_s3", "archive_info")["sha256"],
        "steps": {name: str(step.status.value) for name, step in run.steps.items()},
        "splits": report["counts"]
        | {"duplicates_removed": len(report["duplicates_removed"]), "quarantined": len(report["quarantined"])},
        "metrics": {k: flat[k] for k in SUMMARY_METRICS},
        "sites": site_summary(report, evaluation),
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
