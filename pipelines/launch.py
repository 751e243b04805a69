"""Launching a pipeline run: the stack and its MLflow tracker, the run's experiment, the dataset staged behind the
embedded S3 endpoint, ZenML's run options and schedules, and the finished run read back for its summary.

``run.py`` is the command line over this module; each pipeline's own summary lives beside it in ``pipelines/``.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable
from uuid import UUID

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from zenml import Model
from zenml.client import Client
from zenml.config.schedule import Schedule

from infra.stacks import use_stack
from pipelines import evaluation, feedback, inference, monitoring, training, tuning
from xray.config import PipelineConfig, RegistryConfig
from xray.data.sites import site_name
from xray.errors import ConfigError, ScheduleError
from xray.model import tuning as search
from xray.monitoring.performance.feedback import read_labels
from xray.registry import decisions, tracking
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


def launch_options(config: PipelineConfig, no_cache: bool, schedule, workdir: Path, trials: int = 0) -> dict:
    """ZenML's ``with_options`` of a training or search run: caching, the tracker's experiment, the ZenML Model (named
    as the registered model), the config's ``zenml:`` run configuration (SageMaker checkpoints and trial steps
    expanded) and the schedule."""
    model = training.MODEL
    options = {
        "enable_cache": not no_cache,
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


def train_like(
    pipeline,
    config: PipelineConfig,
    dataset_uri: str | None,
    no_cache: bool,
    cron: str | None,
    summarize: Callable,
    **parameters,
) -> dict:
    """A run that trains (training, a search): the dataset staged, the run launched (or scheduled), its summary."""
    stack = Client().active_stack
    schedule = schedule_for(cron, stack.orchestrator, stack.name) if cron else None
    ensure_experiment(config.registry)
    registry = config.registry
    account = None if registry.require_approval else tracking.may_promote(registry.tracking_uri, registry.model_name)
    if account is not None and not account[1]:
        raise ConfigError(
            f"the MLflow account '{account[0]}' may not move {registry.champion_alias} of {registry.model_name} (it "
            "needs MANAGE there), so the gate could not promote this run: set "
            "registry.require_approval: true (a reviewer approves), or train with a reviewer's account"
        )
    trials = len(parameters.get("trials", ()))
    with ExitStack() as services, tempfile.TemporaryDirectory() as workdir:
        uri = stage_dataset(config, dataset_uri, services)
        run = pipeline.with_options(**launch_options(config, no_cache, schedule, Path(workdir), trials))(
            config=config, dataset_uri=uri, **parameters
        )
        if schedule is not None:
            return {
                "schedule": schedule.name,
                "cron_expression": schedule.cron_expression,
                "stack": stack.name,
                "dataset_uri": uri,
                "list_with": "python run.py --list-schedules",
            }
        with run_outputs(run) as (run, load):
            return summarize(run, load)


def launch(pipeline, registry: RegistryConfig, summarize: Callable, **parameters) -> dict:
    """A run against a registered version (inference, monitoring, evaluation): never cached (an alias can move),
    logged to ``registry.experiment_name``; ``summarize(run, load)`` reads it back; the summary gains the run's ids."""
    ensure_experiment(registry)
    run = pipeline.with_options(enable_cache=False, settings=tracker_settings(registry))(
        registry=registry, **parameters
    )
    with run_outputs(run) as (run, load):
        summary = summarize(run, load)
    return summary | {"pipeline_run_id": str(run.id), "mlflow_tracking_uri": registry.tracking_uri}


def in_experiment(config: PipelineConfig, name: str) -> RegistryConfig:
    return config.registry.model_copy(update={"experiment_name": name})


# -- one entry point per pipeline (run.py --pipeline NAME) ---------------------------------------------------------


def run_training(
    config: PipelineConfig, dataset_uri: str | None, no_cache: bool, cron: str | None, if_changed: bool = False
) -> dict:
    if if_changed:
        skipped = training.unchanged_since(config, dataset_uri)
        if skipped is not None:
            logger.info("--if-changed: %s", skipped["skipped"])
            return skipped
    return train_like(
        training.training_pipeline,
        config,
        dataset_uri,
        no_cache,
        cron,
        lambda run, load: training.summarize(run, load, config),
    )


def run_tuning(config: PipelineConfig, dataset_uri: str | None, no_cache: bool) -> dict:
    """The search: trials drawn here (a pipeline parameter), trained as steps, the winner trained and registered."""
    if config.tuning is None:
        raise ConfigError("--pipeline tuning needs a `tuning:` section in the config (see configs/tuning_smoke.yaml)")
    config = config.model_copy(update={"registry": in_experiment(config, config.tuning.experiment_name)})
    trials = search.sample(config.tuning, config.seed)
    logger.info(
        "search: %d trials (%s, seed %d) of %s",
        len(trials),
        config.tuning.sampler,
        config.seed,
        sorted(config.tuning.space),
    )
    return train_like(
        tuning.tuning_pipeline,
        config,
        dataset_uri,
        no_cache,
        None,
        lambda run, load: tuning.summarize(run, load, config),
        trials=trials,
    )


def run_inference(
    config: PipelineConfig,
    images: str,
    model_version: str,
    output: str,
    explain: int,
    resume: bool,
    write_back: bool = False,
    site: str | None = None,
    shards: int = 1,
) -> dict:
    """Predictions streamed into ``output`` (.csv or .parquet, a path or s3://); Grad-CAM overlays beside it;
    ``shards`` predict steps, each on its share of the listing, merged into ``output``."""
    if not output.startswith("s3://"):
        output = str(Path(output).expanduser().resolve())
    folder = Path(output).parent if not output.startswith("s3://") else Path("outputs")
    return launch(
        inference.inference_pipeline,
        in_experiment(config, config.inference.experiment_name),
        lambda run, load: inference.summarize(load, folder, explain, shards),
        images=images,
        output=output,
        model_version=model_version,
        inference=config.inference,
        limits=config.data.limits,
        resume=resume,
        explain=explain,
        s3_max_attempts=config.s3.max_attempts,
        write_back=write_back,
        site=site,
        prediction_log=config.monitoring.prediction_log,
        shards=shards,
    )


def run_monitoring(config: PipelineConfig, images: str, model_version: str, output: Path) -> dict:
    """The batch against the version's reference profile; report, plots and predictions also written to ``output``."""
    return launch(
        monitoring.monitoring_pipeline,
        in_experiment(config, config.monitoring.experiment_name),
        lambda run, load: monitoring.summarize(load, output),
        images=images,
        model_version=model_version,
        monitoring=config.monitoring,
        inference=config.inference,
        limits=config.data.limits,
        seed=config.seed,
        s3_max_attempts=config.s3.max_attempts,
    )


def run_feedback(config: PipelineConfig, labels: str, period: str | None, site: str | None, output: Path) -> dict:
    """A labels file joined to the prediction log; the file is validated here first, so a malformed one is one
    line and no run."""
    path = Path(labels).expanduser().resolve()
    read_labels(path)
    return launch(
        feedback.feedback_pipeline,
        in_experiment(config, config.monitoring.feedback_experiment_name),
        lambda run, load: feedback.summarize(load, output, config.evaluate.min_sensitivity),
        labels=str(path),
        period=period or config.monitoring.feedback_period,
        site=site,
        monitoring=config.monitoring,
        evaluate=config.evaluate,
        seed=config.seed,
    )


def run_evaluation(
    config: PipelineConfig, dataset_uri: str, model_version: str, site: str | None, recalibrate_fraction: float | None
) -> dict:
    """One registered version on one labelled site."""
    name = site_name(dataset_uri, site)
    return launch(
        evaluation.evaluation_pipeline,
        in_experiment(config, config.evaluate.site_experiment_name),
        lambda run, load: evaluation.summarize(load, name),
        dataset_uri=dataset_uri,
        site=name,
        model_version=model_version,
        recalibrate_fraction=recalibrate_fraction,
        data=config.data,
        s3=config.s3,
        evaluate=config.evaluate,
        seed=config.seed,
    )


def decide(
    config: PipelineConfig, action: str, version: str, reviewer: str | None, reason: str, site: str | None = None
) -> dict:
    """``run.py approve|reject|rollback``: a person's decision on a version (xray.registry.promotion), and the ZenML
    Model version of its training run follows (production, archived). On a tracking server with accounts the record
    names the signed-in account (MLFLOW_TRACKING_USERNAME), never a typed name."""
    user = tracking.authenticated_user(config.registry.tracking_uri)
    if user is not None and reviewer and reviewer != user:
        raise ConfigError(
            f"--reviewer {reviewer} is not the MLflow account signed in ({user}): the record names the signed-in "
            "account; drop --reviewer"
        )
    reviewer = user or reviewer
    if not reviewer:
        raise ConfigError(
            f"{action} needs --reviewer NAME: the MLflow server at {config.registry.tracking_uri} has no accounts"
        )
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    if site is not None:  # approve --operating-point SITE: a site's proposed operating point, not the version
        with tracking.refusals_as_errors(f"MLflow refused the operating point by account '{reviewer}'"):
            result = decisions.apply_operating_point(client, config.registry, version, site, reviewer, reason)
        return result | {"model_name": config.registry.model_name}
    decide_by = {"approve": decisions.approve, "reject": decisions.reject, "rollback": decisions.rollback}
    with tracking.refusals_as_errors(f"MLflow refused the {action} by account '{reviewer}'"):
        result = decide_by[action](client, config.registry, version, reviewer, reason)
    zenml_id = client.get_model_version(config.registry.model_name, version).tags.get("zenml.model_version_id")
    stage = "archived" if action == "reject" else "production"
    if zenml_id:
        Client().update_model_version(config.registry.model_name, UUID(zenml_id), stage=stage, force=True)
        result["zenml_stage"] = stage
    else:
        logger.warning(
            "v%s has no ZenML Model version recorded (registered before approvals): its stage stays", version
        )
    return result | {"model_name": config.registry.model_name, "mlflow_tracking_uri": config.registry.tracking_uri}


def schedules() -> list[str]:
    """One line per schedule of the active ZenML project, and how to delete one."""
    items = Client().list_schedules(size=100).items
    lines = [f"{item.name}\tcron={item.cron_expression}\tactive={item.active}\tid={item.id}" for item in items]
    return (lines or ["no schedules in the active ZenML project"]) + [
        "delete one with: zenml pipeline schedule delete <name>; on SageMaker also delete the EventBridge schedule "
        "(aws scheduler delete-schedule --name <name>; docs/sagemaker.md)"
    ]
