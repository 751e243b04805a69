"""The search: the data steps once, one training step per trial, selection on val, then the winner trained,
evaluated and registered through the same steps and gate as a training run; its launch and its summary."""

import logging

from zenml import pipeline
from zenml.enums import ExecutionMode

from pipelines import launch, training
from pipelines.training import MODEL, evaluate_and_register
from steps.datasets import build_datasets
from steps.ingest import ingest_from_s3, locate_archive, locate_sources
from steps.prepare import unzip_and_validate
from steps.tracking import mark_run_failed
from steps.train import train_model
from steps.tuning import select_trial, train_trial
from xray.config.pipeline import PipelineConfig
from xray.model import tuning as search
from xray.requests import TuningRequest

logger = logging.getLogger(__name__)


@pipeline(name="chest_xray_tuning", model=MODEL, execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def tuning_pipeline(request: TuningRequest, trials: list[dict]) -> None:
    config = request.config
    identity = locate_archive(dataset_uri=request.dataset_uri, s3=config.s3, expected_sha256=config.expected_sha256)
    sources = locate_sources(data=config.data, s3=config.s3)
    raw_archive = ingest_from_s3(identity, s3=config.s3, expected_sha256=config.expected_sha256)
    dataset, data_report, _ = unzip_and_validate(
        raw_archive, data=config.data, seed=config.seed, s3=config.s3, source_identities=sources
    )
    # One step per trial: on a stack with a step operator (configs/tuning_sagemaker.yaml) they run side by side.
    results = [
        train_trial(dataset, config=config, overrides=overrides, trial=index, id=f"train_trial_{index}")
        for index, overrides in enumerate(trials)
    ]
    model_config, train_config, _ = select_trial(results, config=config)
    spec = build_datasets(dataset, data=config.data, model=model_config, train=train_config, seed=config.seed)
    model, history, _ = train_model(dataset, spec, model=model_config, train=train_config)
    evaluate_and_register(model, dataset, spec, data_report, history, config)


def run_tuning(request: TuningRequest) -> dict:
    """``tune``: trials drawn here (a pipeline parameter), trained as steps, the winner trained and registered."""
    config, settings = request.config, request.search
    request = request.on(
        config.model_copy(
            update={"registry": config.registry.model_copy(update={"experiment_name": settings.experiment_name})}
        )
    )
    trials = search.sample(settings, config.seed)
    logger.info(
        "search: %d trials (%s, seed %d) of %s",
        len(trials),
        settings.sampler,
        config.seed,
        sorted(settings.space),
    )
    summarize_search = lambda run, load: summarize(run, load, request.config)  # noqa: E731
    return launch.train_like(tuning_pipeline, request, MODEL, summarize_search, trials=trials)


def summarize(run, load, config: PipelineConfig) -> dict:
    """A training run's summary, plus the search: every trial and the winner."""
    search = load("select_trial", "search")
    return training.summarize(run, load, config) | {
        "tuning": {
            "winner": search.winner["trial"],
            "winner_val_auc": search.winner["val_auc"],
            "trials": [
                {key: trial[key] for key in ("trial", "status", "val_auc", "overrides", "error", "mlflow_run_id")}
                for trial in search.trials
            ],
        }
    }
