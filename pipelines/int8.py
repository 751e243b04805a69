"""``int8`` on request: a registered version without an int8 model gets one, made as at registration on the split of
the data it was trained on (the training pipeline's first steps, cached from its run), stored and sealed with it."""

from contextlib import ExitStack

from zenml import pipeline
from zenml.enums import ExecutionMode

from pipelines import launch
from steps.ingest import ingest_from_s3, locate_archive, locate_sources
from steps.prepare import unzip_and_validate
from steps.register import quantize_version
from steps.tracking import mark_run_failed
from steps.version import resolve_model_version
from xray.requests import Int8Request


@pipeline(name="chest_xray_int8", execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def int8_pipeline(request: Int8Request) -> None:
    config = request.config
    model_info = resolve_model_version(model_version=request.model_version, registry=config.registry)
    identity = locate_archive(dataset_uri=request.dataset_uri, s3=config.s3, expected_sha256=config.expected_sha256)
    sources = locate_sources(data=config.data, s3=config.s3)
    raw_archive = ingest_from_s3(identity, s3=config.s3, expected_sha256=config.expected_sha256)
    dataset, data_report, _ = unzip_and_validate(
        raw_archive, data=config.data, seed=config.seed, s3=config.s3, source_identities=sources
    )
    quantize_version(model_info, dataset, data_report, request=request)


def run_int8(request: Int8Request) -> dict:
    """``int8``: the run, its dataset staged as for train; the summary says what became of the int8."""
    config = request.config
    launch.ensure_experiment(config.registry)
    with ExitStack() as services:
        staged = request.model_copy(update={"dataset_uri": launch.stage_dataset(config, request.dataset_uri, services)})
        run = int8_pipeline.with_options(settings=launch.tracker_settings(config.registry))(request=staged)
        with launch.run_outputs(run) as (run, load):
            info = load("resolve_model_version", "model_info")
            return {
                "pipeline_run_id": str(run.id),
                "model_name": config.registry.model_name,
                "model_version": info.version,
                "int8": load("quantize_version", "int8").summary(),
                "mlflow_tracking_uri": config.registry.tracking_uri,
            }
