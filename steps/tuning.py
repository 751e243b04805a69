"""Steps of the search: one trial (a short training scored on val), and the selection of the winner."""

import json
import logging
from dataclasses import asdict
from typing import Annotated, Any, List, Tuple

import keras
import mlflow
import pandas as pd
from zenml import step

from steps.caching import DOMAIN_CODE
from steps.tracking import log_config, mlflow_run
from xray.config.base import flatten
from xray.config.model import ModelConfig
from xray.config.pipeline import PipelineConfig
from xray.config.train import TrainConfig
from xray.data import inputs
from xray.data.dataset import ValidatedDataset
from xray.model import training, tuning
from xray.registry import tracking

logger = logging.getLogger(__name__)


@step(cache_policy=DOMAIN_CODE, experiment_tracker=True)
def train_trial(
    dataset: ValidatedDataset, config: PipelineConfig, overrides: dict, trial: int
) -> Annotated[tuning.Trial, "trial_result"]:
    """Train one trial for tuning.epochs and score it on val; its own MLflow run, a child of the search's run."""
    chosen = tuning.trial_config(config, overrides, trial=True)
    spec = inputs.spec_from_config(dataset.manifest, chosen.data, chosen.model, chosen.train, chosen.seed)
    train_ds, val_ds = inputs.fit_datasets(dataset, spec)
    logger.info("trial %d: %s", trial, overrides)
    with mlflow_run():
        child = mlflow.start_run(run_name=f"trial-{trial}", nested=True)
        result: dict[str, Any] = {"status": tuning.FAILED, "error": "interrupted", "val_auc": None}
        try:
            mlflow.log_params(flatten({"model": chosen.model.model_dump(mode="json")}))
            mlflow.log_params(flatten({"train": chosen.train.model_dump(mode="json")}))
            mlflow.set_tags({"trial": trial, "tuned": ", ".join(sorted(overrides))})
            result = tuning.run_trial(
                lambda: training.fit(
                    chosen.model,
                    chosen.train,
                    spec,
                    (train_ds, val_ds),
                    extra_callbacks=[tracking.epoch_logger(), keras.callbacks.TerminateOnNaN()],
                    keep_model=False,
                )
            )
            if result["status"] == tuning.OK:
                mlflow.log_metric("val_auc", result["val_auc"])
            mlflow.set_tags({"status": result["status"], "error": result["error"]})
        finally:
            mlflow.end_run("FINISHED" if result["status"] == tuning.OK else "FAILED")
    logger.info("trial %d: %s", trial, result)
    return tuning.Trial(trial, overrides, child.info.run_id, **result)


@step(cache_policy=DOMAIN_CODE, experiment_tracker=True)
def select_trial(
    results: List[tuning.Trial], config: PipelineConfig
) -> Tuple[
    Annotated[ModelConfig, "model_config"], Annotated[TrainConfig, "train_config"], Annotated[tuning.Search, "search"]
]:
    """The trial with the best val AUC (never test), as the config the winner is trained with for train.epochs."""
    rows = sorted((asdict(r) for r in results), key=lambda r: r["trial"])
    winner = tuning.select(rows)
    chosen = tuning.trial_config(config, winner["overrides"])
    table = pd.DataFrame(
        [{"trial": r["trial"], "status": r["status"], "val_auc": r["val_auc"], **r["overrides"]} for r in rows]
    )
    logger.info("search of %d trials:\n%s\nwinner: trial %d", len(rows), table.to_string(index=False), winner["trial"])
    settings = config.tuning
    assert settings is not None  # TuningRequest requires the section
    with mlflow_run():
        log_config(tuning=settings.model_dump(mode="json", exclude={"space"}))
        mlflow.log_params(
            {"tuning.winner_trial": winner["trial"], "tuning.failed_trials": int((table["status"] != "ok").sum())}
        )
        mlflow.log_metric("tuning_best_val_auc", winner["val_auc"])
        mlflow.log_text(json.dumps(settings.model_dump(mode="json")["space"], indent=1), "tuning/space.json")
        mlflow.log_text(table.to_csv(index=False), "tuning/trials.csv")
        mlflow.log_text(tuning.winner_yaml(config, winner), "tuning/winner.yaml")
    return chosen.model, chosen.train, tuning.Search(rows, winner)
