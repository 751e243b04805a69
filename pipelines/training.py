"""Wiring only: the eight training steps and the artifacts between them."""

from zenml import Model, pipeline
from zenml.enums import ExecutionMode

from steps import (
    build_datasets,
    evaluate_model,
    ingest_from_s3,
    locate_archive,
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
    raw_archive, archive_info = ingest_from_s3(identity, s3=config.s3, expected_sha256=config.expected_sha256)
    dataset, _, data_report, _, _ = unzip_and_validate(raw_archive, data=config.data, seed=config.seed)
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
    )
