"""MLflow inside steps: the active stack's experiment tracker opens the run, the steps log into it.

Every step that logs is declared with ``experiment_tracker=True`` (the active stack's tracker): ZenML's MLflow
tracker starts or resumes one MLflow run per pipeline run (named after it) before the step and ends it after, with
status FAILED when the step failed. The tracking URI and experiment come from the stack and the run's settings
(run.py), never from a lookup here.
"""

import json
import logging
import warnings
from contextlib import contextmanager

import mlflow

from xray.config.base import flatten

logger = logging.getLogger(__name__)


class NoExperimentTracker(RuntimeError):
    pass


@contextmanager
def mlflow_run():
    """The pipeline run's MLflow run, opened by the stack's experiment tracker."""
    run = mlflow.active_run()
    if run is None:
        raise NoExperimentTracker(
            "this step logs to MLflow but no MLflow run is active: the active ZenML stack has no MLflow experiment "
            "tracker (run through run.py, which selects a stack with one, or add one: docs/OPERATIONS.md 'Team stack')"
        )
    yield run


def log_images(images: dict, folder: str = "plots") -> None:
    for name, image in images.items():
        mlflow.log_image(image, f"{folder}/{name}.png")


def log_config(**sections) -> None:
    """Params under the config's own dotted names, e.g. ``train.batch_size``."""
    params = {}
    for name, section in sections.items():
        value = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
        params.update(flatten({name: value}))
    mlflow.log_params(params)


def log_sources(sites: dict) -> None:
    """One MLflow dataset input per training source (data.sources): its URI, content digest and counts per split and
    class (the run page's "Datasets used")."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for site, entry in sites.items():
        with warnings.catch_warnings():
            # MLflow registers two local-file source classes and warns that a path could be either.
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(entry["uri"])
        # MLflow declares profile abstract on its base and instantiates MetaDataset itself.
        dataset = MetaDataset(source, name=site, digest=entry["digest"][:32])  # type: ignore[abstract]
        counts = {split: sum(by_class.values()) for split, by_class in entry["counts"].items()}
        mlflow.log_input(
            dataset,
            context="training",
            tags={
                "site": site,
                "splits_from": entry["splits_from"][:250],
                "counts": json.dumps(entry["counts"]),
                **{f"images.{split}": str(n) for split, n in counts.items()},
            },
        )


def mark_run_failed(exception: BaseException) -> None:
    """on_failure hook of every pipeline. It runs inside the failed step, before the experiment tracker ends the
    MLflow run as FAILED: the run gains the failed step and the error's first line as tags, so the MLflow UI says
    why."""
    from zenml import get_step_context

    run = mlflow.active_run()
    if run is None:
        logger.warning("no MLflow run active in the failed step; its error is not recorded in MLflow")
        return
    message = (str(exception).splitlines() or [type(exception).__name__])[0][:500]
    mlflow.set_tags(
        {"error": f"{type(exception).__name__}: {message}", "failed_step": get_step_context().step_run.name}
    )
