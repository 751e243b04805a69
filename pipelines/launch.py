"""Launching a pipeline run, and nothing else: the stack and its MLflow tracker, the run's experiment, the dataset
staged behind the embedded S3 endpoint, ZenML's run options and schedules, and the finished run read back for its
summary. Each pipeline's own launch (``run_<job>``) and summary live beside it in ``pipelines/``; the command line
(cli/) calls those. pyproject.toml's import contract keeps this module free of the jobs' domain.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from zenml import Model
from zenml.client import Client
from zenml.config.schedule import Schedule

from infra.stacks import use_stack
from xray.config.pipeline import PipelineConfig
from xray.config.registry import RegistryConfig
from xray.errors import ConfigError, ScheduleError
from xray.registry import tracking
from xray.schedule import CronError, schedule_name, validate_aws_cron
from xray.storage import s3, sources

logger = logging.getLogger(__name__)


def on_stack(config: PipelineConfig, stack_name: str | None) -> PipelineConfig:
    """Activate the run's ZenML stack; the config's registry.tracking_uri becomes its tracker's URI, so that the steps'
    registry reads (and the summary) name the store the tracker logs to."""
    explicit = bool(os.environ.get("MLFLOW_TRACKING_URI") or config.registry.tracking_uri)
    name, uri = use_stack(stack_name, tracking.tracking_uri(config.registry.tracking_uri), explicit)
    mlflow.set_tracking_uri(uri)  # this process's own fluent MLflow calls (a card's download) go there too
    logger.info("ZenML stack: %s; MLflow: %s", name, uri)
    return config.model_copy(update={"registry": config.registry.model_copy(update={"tracking_uri": uri})})


def stage_dataset(config: PipelineConfig, dataset_uri: str | None, services: ExitStack) -> str:
    """Resolve the archive; in embedded mode put a locally found one behind moto S3."""
    source = sources.resolve(dataset_uri or config.dataset_uri)
    logger.info("dataset: %s (%s)", source.uri, source.origin)
    if not (config.s3.embedded and source.discovered_locally):
        return source.uri
    embedded = services.enter_context(s3.EmbeddedS3())
    location = s3.S3Location(config.s3.bucket, config.s3.key)
    client = s3.make_client(config.s3.max_attempts)
    uploaded = s3.upload_if_missing(client, Path(source.uri), location)
    logger.info("embedded S3 at %s: %s %s", embedded.endpoint, "uploaded to" if uploaded else "found", location.uri)
    return location.uri


@contextmanager
def run_outputs(run):
    """The finished pipeline run, fetched again from the ZenML store, and ``load(step, output)`` for its artifacts:
    the one place a launch reads artifacts back to build its summary and files. Use what ``load`` returns inside the
    ``with``: outside a step, ZenML's materializers leave their local copies (an image's file, which PIL reads
    lazily) for the caller to remove, so they are made in a folder removed on exit."""
    run = Client().get_pipeline_run(run.id)

    def load(step: str, output: str):
        return run.steps[step].outputs[output][0].load()

    with tempfile.TemporaryDirectory(prefix="xray-outputs-") as scratch:
        default, tempfile.tempdir = tempfile.tempdir, scratch
        try:
            yield run, load
        finally:
            tempfile.tempdir = default


def schedule_for(cron: str, orchestrator, stack_name: str) -> Schedule:
    """A ZenML Schedule, after the cron and the stack have both been checked."""
    from croniter import croniter  # lazy: only a scheduled launch needs it

    if orchestrator.flavor == "sagemaker" or cron.strip().startswith("cron("):
        expression = validate_aws_cron(cron)
    else:
        if not croniter.is_valid(cron):
            raise CronError(f"invalid schedule '{cron}': not a cron expression")
        expression = cron
    if not orchestrator.config.is_schedulable:
        raise ScheduleError(
            f"stack '{stack_name}' cannot schedule runs: its orchestrator '{orchestrator.name}' "
            f"({orchestrator.flavor}) has no scheduler; register and activate a SageMaker stack "
            "(scripts/register_sagemaker_stack.sh) first"
        )
    return Schedule(name=schedule_name(expression), cron_expression=expression)


def tracker_settings(registry: RegistryConfig) -> dict:
    """The stack's experiment tracker opens the run's MLflow run in ``registry.experiment_name``."""
    return {"experiment_tracker": {"experiment_name": registry.experiment_name}}


def ensure_experiment(registry: RegistryConfig) -> None:
    """Create the run's MLflow experiment before the tracker does, so that a SQLite store keeps its artifacts beside it
    (the tracker would leave them under ./mlruns). Needs the URI that on_stack pinned: an unset one would make MLflow
    fall back to ./mlflow.db in whatever directory this runs from."""
    if not registry.tracking_uri:
        raise ValueError("registry.tracking_uri is unset: on_stack() pins the stack's tracking URI before a launch")
    tracking.experiment_id(MlflowClient(tracking_uri=registry.tracking_uri), registry.experiment_name)


def with_sagemaker_checkpoints(zenml_config: dict, backup_dir: str | None, artifact_root: str) -> dict:
    """SageMaker syncs a job's checkpoint folder with S3 only when its estimator has ``checkpoint_s3_uri``: every step
    run by the SageMaker step operator gets one under the stack's artifact store, with ``train.backup_dir`` as the
    local folder, so a retried or spot-interrupted job resumes from its last epoch."""
    result = copy.deepcopy(zenml_config)
    for name, step in (result.get("steps") or {}).items():
        estimator = ((step.get("settings") or {}).get("step_operator.sagemaker") or {}).get("estimator_args")
        if estimator is None or not backup_dir or "checkpoint_s3_uri" in estimator:
            continue
        if not artifact_root.startswith("s3://"):
            raise ConfigError(
                f"step {name} runs on SageMaker with train.backup_dir {backup_dir}, but the stack's "
                f"artifact store {artifact_root} is not on S3: set estimator_args.checkpoint_s3_uri"
            )
        estimator["checkpoint_s3_uri"] = f"{artifact_root.rstrip('/')}/checkpoints/{name}"
        estimator["checkpoint_local_path"] = backup_dir
    return result


def with_trial_steps(zenml_config: dict, trials: int) -> dict:
    """``steps.train_trial`` of a tuning config applies to every trial's step (``train_trial_0``, ``train_trial_1``...)."""
    result = copy.deepcopy(zenml_config)
    steps = result.get("steps") or {}
    template = steps.pop("train_trial", None)
    if template is not None:
        steps.update({f"train_trial_{index}": copy.deepcopy(template) for index in range(trials)})
    return result


def launch_options(request, schedule, workdir: Path, model: Model, trials: int = 0) -> dict:
    """ZenML's ``with_options`` of a training or search run: caching, the tracker's experiment, the ZenML Model (named
    as the registered model), the config's ``zenml:`` run configuration (SageMaker checkpoints and trial steps
    expanded) and the schedule."""
    config = request.config
    options = {
        "enable_cache": not request.no_cache,
        "settings": tracker_settings(config.registry),
        "model": Model(name=config.registry.model_name, description=model.description, tags=model.tags),
    }
    if config.zenml:
        zenml_config = with_sagemaker_checkpoints(
            with_trial_steps(config.zenml, trials), config.train.backup_dir, Client().active_stack.artifact_store.path
        )
        path = workdir / "zenml_run_config.yaml"
        path.write_text(yaml.safe_dump(zenml_config))
        options["config_path"] = str(path)
    if schedule is not None:
        options["schedule"] = schedule
    return options


def check_promotion_rights(registry: RegistryConfig) -> None:
    """A run whose MLflow account may not move champion needs registry.require_approval (a reviewer approves): said
    before any training, not after."""
    account = None if registry.require_approval else tracking.may_promote(registry.tracking_uri, registry.model_name)
    if account is not None and not account[1]:
        raise ConfigError(
            f"the MLflow account '{account[0]}' may not move {registry.champion_alias} of {registry.model_name} (it "
            "needs MANAGE there), so the gate could not promote this run: set "
            "registry.require_approval: true (a reviewer approves), or train with a reviewer's account"
        )


def train_like(pipeline, request, model: Model, summarize: Callable, **parameters) -> dict:
    """A run that trains (training, a search): the dataset staged, the run launched (or scheduled) with the request
    (its ``dataset_uri`` the staged one), its summary."""
    config, cron = request.config, getattr(request, "schedule", None)
    stack = Client().active_stack
    schedule = schedule_for(cron, stack.orchestrator, stack.name) if cron else None
    ensure_experiment(config.registry)
    check_promotion_rights(config.registry)
    trials = len(parameters.get("trials", ()))
    with ExitStack() as services, tempfile.TemporaryDirectory() as workdir:
        staged = request.model_copy(update={"dataset_uri": stage_dataset(config, request.dataset_uri, services)})
        options = launch_options(staged, schedule, Path(workdir), model, trials)
        run = pipeline.with_options(**options)(request=staged, **parameters)
        if schedule is not None:
            return {
                "schedule": schedule.name,
                "cron_expression": schedule.cron_expression,
                "stack": stack.name,
                "dataset_uri": staged.dataset_uri,
                "list_with": "python3 run.py schedules",
            }
        with run_outputs(run) as (run, load):
            return summarize(run, load)


def launch(pipeline, request, experiment: str, summarize: Callable) -> dict:
    """A run against a registered version (inference, monitoring, evaluation, feedback): never cached (an alias can
    move), logged to the MLflow ``experiment``; ``summarize(run, load)`` reads it back; the summary gains the run's
    ids."""
    registry = request.config.registry.model_copy(update={"experiment_name": experiment})
    request = request.on(request.config.model_copy(update={"registry": registry}))
    ensure_experiment(registry)
    run = pipeline.with_options(enable_cache=False, settings=tracker_settings(registry))(request=request)
    with run_outputs(run) as (run, load):
        summary = summarize(run, load)
    return summary | {"pipeline_run_id": str(run.id), "mlflow_tracking_uri": registry.tracking_uri}


def schedules() -> list[str]:
    """One line per schedule of the active ZenML project, and how to delete one."""
    items = Client().list_schedules(size=100).items
    lines = [f"{item.name}\tcron={item.cron_expression}\tactive={item.active}\tid={item.id}" for item in items]
    return (lines or ["no schedules in the active ZenML project"]) + [
        "delete one with: zenml pipeline schedule delete <name>; on SageMaker also delete the EventBridge schedule "
        "(aws scheduler delete-schedule --name <name>; docs/sagemaker.md)"
    ]
