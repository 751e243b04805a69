"""Command line: parse flags, load and validate the config, start embedded services, launch, summarise.

python run.py --pipeline training [--config PATH] [--dataset-uri URI] [--no-cache] [--summary PATH]
              [--schedule CRON] [--list-schedules]
python run.py --pipeline tuning --config configs/tuning_smoke.yaml [--dataset-uri URI] [--no-cache]
python run.py --pipeline inference --images PATH_OR_S3_PREFIX [--model-version champion|N]
              [--output preds.csv|preds.parquet|s3://bucket/preds.parquet] [--resume] [--explain N]
python run.py --pipeline monitoring --images DIR|ZIP|s3://prefix [--model-version champion|N]
              [--output outputs/monitoring] [--fail-on-drift]
python run.py --pipeline evaluation --dataset-uri ZIP|DIR|s3://...zip [--model-version champion|N]
              [--site NAME] [--recalibrate-fraction F]
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "training_local.yaml"
DRIFT_EXIT_CODE = 3
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

# Before TensorFlow or ZenML is imported anywhere (xray/environment.py says why each is set).
from xray.environment import apply_defaults  # noqa: E402

apply_defaults()


# The real stdout when run as a script (see the bottom of this file): it carries the command's result (the one
# JSON summary line, or the schedule listing) and nothing else.
RESULT_STREAM = None
logger = logging.getLogger("run")


def emit(line: str) -> None:
    click.echo(line, file=RESULT_STREAM or sys.stdout)


LOG_LEVELS = ("debug", "info", "warning", "error")
# Third-party loggers kept at WARNING unless -v: moto's request lines (werkzeug), botocore's credential notices,
# MLflow's "creating tables" and "View run at" lines.
NOISY = ("werkzeug", "botocore", "boto3", "urllib3", "s3transfer", "mlflow", "alembic")
# Printed by TensorFlow's C++ runtime at `import tensorflow`, before any log level applies (TF_CPP_MIN_LOG_LEVEL does
# not reach them): dropped at the default level, kept with -v.
TF_IMPORT_BANNER = (
    "oneDNN custom operations are on",
    "All log messages before absl::InitializeLog()",
    "cpu_feature_guard",
    "This TensorFlow binary is optimized",
)
VERBOSE = False


def configure_logging(level: str) -> None:
    """Before ZenML or TensorFlow is imported: the project's loggers at ``level``, ZenML's at ``level``,
    third-party noise at WARNING (INFO with debug), and TensorFlow's import banner dropped unless debug."""
    global VERBOSE
    VERBOSE = level == "debug"
    numeric = getattr(logging, level.upper())
    os.environ["ZENML_LOGGING_VERBOSITY"] = level.upper()
    # MLflow sets its own logger's level when imported, from this variable.
    os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO" if VERBOSE else logging.getLevelName(max(numeric, logging.WARNING))
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if VERBOSE else os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("run", "xray", "steps", "pipelines", "infra", "materializers"):
        logging.getLogger(name).setLevel(numeric)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.INFO if VERBOSE else max(numeric, logging.WARNING))
    # After every step ZenML's MLflow tracker disables autologging for frameworks this project never autologs, and
    # warns about fastai (not installed); nothing to act on.
    logging.getLogger("zenml.integrations.mlflow.experiment_trackers.mlflow_experiment_tracker").addFilter(
        lambda record: not record.getMessage().startswith("Failed to disable MLflow autologging")
    )
    if not VERBOSE:
        import_tensorflow_quietly()


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with file descriptor 2 captured, then pass on every line but the import banner."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not any(marker in line for marker in TF_IMPORT_BANNER):
                    sys.stderr.write(line)
            sys.stderr.flush()


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def expected_error(error: BaseException):
    """The XrayError behind a failure, however deep ZenML wrapped it."""
    from xray.errors import XrayError

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, XrayError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class HideExpectedTracebacks(logging.Filter):
    """ZenML logs a failed step with its traceback; for a known bad input one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and expected_error(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_failures() -> None:
    if VERBOSE:  # -v: ZenML's traceback of the failed step stays
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(HideExpectedTracebacks())


def stage_dataset(config, dataset_uri: str | None, services: ExitStack) -> str:
    """Resolve the archive; in embedded mode put a locally found one behind moto S3."""
    from xray import s3, sources

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
    the one place run.py reads artifacts back to build its summary and files. Use what ``load`` returns inside the
    ``with``: outside a step, ZenML's materializers leave their local copies (an image's file, which PIL reads
    lazily) for the caller to remove, so they are made in a folder removed on exit."""
    from zenml.client import Client

    run = Client().get_pipeline_run(run.id)

    def load(step: str, output: str):
        return run.steps[step].outputs[output][0].load()

    with tempfile.TemporaryDirectory(prefix="xray-outputs-") as scratch:
        default, tempfile.tempdir = tempfile.tempdir, scratch
        try:
            yield run, load
        finally:
            tempfile.tempdir = default


def summarize(run, load, config) -> dict:
    """The training summary of a run fetched by :func:`run_outputs` (training and search runs share it)."""
    registration = load("register_model", "registration")
    report = load("unzip_and_validate", "data_report")
    flat = load("evaluate_model", "metrics")["flat"]
    return {
        "pipeline_run_id": str(run.id),
        "mlflow_run_id": registration["mlflow_run_id"],
        "mlflow_tracking_uri": config.registry.tracking_uri,
        "model_name": registration["model_name"],
        "model_version": registration["model_version"],
        "promoted": registration["promoted"],
        "promotion_reason": registration["reason"],
        "threshold": registration["threshold"],
        "seed": config.seed,
        "dataset_sha256": load("ingest_from_s3", "archive_info")["sha256"],
        "steps": {name: str(step.status.value) for name, step in run.steps.items()},
        "splits": report["counts"]
        | {"duplicates_removed": len(report["duplicates_removed"]), "quarantined": len(report["quarantined"])},
        "metrics": {k: flat[k] for k in SUMMARY_METRICS},
    }


def schedule_for(cron: str, orchestrator, stack_name: str):
    """A ZenML Schedule, after the cron and the stack have both been checked."""
    from zenml.config.schedule import Schedule

    from xray.errors import ScheduleError
    from xray.schedule import CronError, validate_aws_cron

    if orchestrator.flavor == "sagemaker" or cron.strip().startswith("cron("):
        expression = validate_aws_cron(cron)
    else:
        from croniter import croniter

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


def schedule_name(expression: str) -> str:
    """The same name for the same cron expression in every process (``hash()`` of a str is salted per process)."""
    import hashlib

    return f"chest-xray-training-{hashlib.sha256(expression.strip().encode()).hexdigest()[:10]}"


def tracker_settings(registry) -> dict:
    """The stack's experiment tracker opens the run's MLflow run in ``registry.experiment_name``."""
    return {"experiment_tracker": {"experiment_name": registry.experiment_name}}


def ensure_experiment(registry) -> None:
    """Create the run's MLflow experiment before the tracker does, so that a SQLite store keeps its artifacts beside it
    (the tracker would leave them under ./mlruns). Needs the URI that on_stack pinned: an unset one would make MLflow
    fall back to ./mlflow.db in whatever directory this runs from."""
    from mlflow.tracking import MlflowClient

    from xray import tracking

    if not registry.tracking_uri:
        raise ValueError("registry.tracking_uri is unset: on_stack() pins the stack's tracking URI before a launch")
    tracking.experiment_id(MlflowClient(tracking_uri=registry.tracking_uri), registry.experiment_name)


def with_sagemaker_checkpoints(zenml_config: dict, backup_dir: str | None, artifact_root: str) -> dict:
    """SageMaker syncs a job's checkpoint folder with S3 only when its estimator has ``checkpoint_s3_uri``: every step
    run by the SageMaker step operator gets one under the stack's artifact store, with ``train.backup_dir`` as the
    local folder, so a retried or spot-interrupted job resumes from its last epoch."""
    import copy

    from xray.errors import ConfigError

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
    import copy

    result = copy.deepcopy(zenml_config)
    steps = result.get("steps") or {}
    template = steps.pop("train_trial", None)
    if template is not None:
        steps.update({f"train_trial_{index}": copy.deepcopy(template) for index in range(trials)})
    return result


def launch_options(config, no_cache: bool, schedule, workdir: Path, trials: int = 0) -> dict:
    from zenml import Model

    from pipelines.training import MODEL

    options = {
        "enable_cache": not no_cache,
        "settings": tracker_settings(config.registry),
        "model": Model(name=config.registry.model_name, description=MODEL.description, tags=MODEL.tags),
    }
    if config.zenml:
        import yaml
        from zenml.client import Client

        zenml_config = with_sagemaker_checkpoints(
            with_trial_steps(config.zenml, trials), config.train.backup_dir, Client().active_stack.artifact_store.path
        )
        path = workdir / "zenml_run_config.yaml"
        path.write_text(yaml.safe_dump(zenml_config))
        options["config_path"] = str(path)
    if schedule is not None:
        options["schedule"] = schedule
    return options


def run_training(config, dataset_uri: str | None, no_cache: bool, cron: str | None) -> dict:
    from zenml.client import Client

    from pipelines.training import training_pipeline

    quiet_expected_failures()
    stack = Client().active_stack
    schedule = schedule_for(cron, stack.orchestrator, stack.name) if cron else None
    ensure_experiment(config.registry)
    with ExitStack() as services, tempfile.TemporaryDirectory() as workdir:
        uri = stage_dataset(config, dataset_uri, services)
        run = training_pipeline.with_options(**launch_options(config, no_cache, schedule, Path(workdir)))(
            config=config, dataset_uri=uri
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
            return summarize(run, load, config)


def run_tuning(config, dataset_uri: str | None, no_cache: bool) -> dict:
    """The search: trials drawn here (a pipeline parameter), trained as steps, the winner trained and registered."""
    from pipelines.tuning import tuning_pipeline
    from xray import tuning
    from xray.errors import ConfigError

    if config.tuning is None:
        raise ConfigError("--pipeline tuning needs a `tuning:` section in the config (see configs/tuning_smoke.yaml)")
    quiet_expected_failures()
    config = config.model_copy(
        update={"registry": config.registry.model_copy(update={"experiment_name": config.tuning.experiment_name})}
    )
    trials = tuning.sample(config.tuning, config.seed)
    logger.info(
        "search: %d trials (%s, seed %d) of %s",
        len(trials),
        config.tuning.sampler,
        config.seed,
        sorted(config.tuning.space),
    )
    ensure_experiment(config.registry)
    with ExitStack() as services, tempfile.TemporaryDirectory() as workdir:
        uri = stage_dataset(config, dataset_uri, services)
        run = tuning_pipeline.with_options(**launch_options(config, no_cache, None, Path(workdir), len(trials)))(
            config=config, dataset_uri=uri, trials=trials
        )
        with run_outputs(run) as (run, load):
            summary, search = summarize(run, load, config), load("select_trial", "search")
    return summary | {
        "tuning": {
            "winner": search["winner"]["trial"],
            "winner_val_auc": search["winner"]["val_auc"],
            "trials": [
                {key: trial[key] for key in ("trial", "status", "val_auc", "overrides", "error", "mlflow_run_id")}
                for trial in search["trials"]
            ],
        }
    }


def run_inference(config, images: str, model_version: str, output: str, explain: int, resume: bool) -> dict:
    """The inference pipeline: predictions are streamed into ``output`` (.csv or .parquet, a path or s3://)."""
    from pipelines.inference import inference_pipeline

    quiet_expected_failures()
    registry = config.registry.model_copy(update={"experiment_name": config.inference.experiment_name})
    ensure_experiment(registry)
    if not output.startswith("s3://"):
        output = str(Path(output).expanduser().resolve())
    run = inference_pipeline.with_options(enable_cache=False, settings=tracker_settings(registry))(
        images=images,
        output=output,
        model_version=model_version,
        registry=registry,
        inference=config.inference,
        limits=config.data.limits,
        resume=resume,
        explain=explain,
        s3_max_attempts=config.s3.max_attempts,
    )
    folder = Path(output).parent if not output.startswith("s3://") else Path("outputs")
    with run_outputs(run) as (run, load):
        summary = load("predict_batch", "prediction_summary")
        overlays = load("explain_predictions", "gradcam") if explain else {}
        folder.mkdir(parents=True, exist_ok=True)
        for name, image in overlays.items():
            image.save(folder / name)
        info = load("resolve_model_version", "model_info")
    return {
        "pipeline_run_id": str(run.id),
        **summary,
        "model_uri": info["uri"],
        "model_version": info["version"],
        "threshold": info["threshold"],
        "gradcam": sorted(str(folder / name) for name in overlays),
        "mlflow_tracking_uri": registry.tracking_uri,
    }


def run_monitoring(config, images: str, model_version: str, output: Path) -> dict:
    """The monitoring pipeline; the report, plots and predictions are also written under ``output``."""

    from pipelines.monitoring import monitoring_pipeline

    quiet_expected_failures()
    registry = config.registry.model_copy(update={"experiment_name": config.monitoring.experiment_name})
    ensure_experiment(registry)
    run = monitoring_pipeline.with_options(enable_cache=False, settings=tracker_settings(registry))(
        images=images,
        model_version=model_version,
        registry=registry,
        monitoring=config.monitoring,
        inference=config.inference,
        limits=config.data.limits,
        seed=config.seed,
        s3_max_attempts=config.s3.max_attempts,
    )
    output.mkdir(parents=True, exist_ok=True)
    with run_outputs(run) as (run, load):
        report = load("check_drift", "drift_report")
        load("score_batch", "predictions").to_csv(output / "predictions.csv", index=False)
        (output / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
        (output / "report.html").write_text(load("check_drift", "report_html"))
        for name, image in load("check_drift", "monitoring_plots").items():
            image.save(output / f"{name}.png")
    return {
        "drift_detected": report["drift_detected"],
        "p_value": report["p_value"],
        "ood_fraction": report["ood_fraction"],
        "images": report["images"],
        "readable": report["readable"],
        "ood_images": report["ood_images"],
        "reference_ood_fraction": report["reference_ood_fraction"],
        "embedding_p_value": report["embedding"]["p_value"],
        "positive_rate": report["positive_rate"]["batch"],
        "reference_positive_rate": report["positive_rate"]["reference"],
        "model_uri": report["model_uri"],
        "model_version": report["model_version"],
        "report": str(output / "report.html"),
        "pipeline_run_id": str(run.id),
        "mlflow_tracking_uri": registry.tracking_uri,
    }


def run_evaluation(
    config, dataset_uri: str, model_version: str, site: str | None, recalibrate_fraction: float | None
) -> dict:
    """The evaluation pipeline: one registered version on one labelled site."""

    from pipelines.evaluation import evaluation_pipeline
    from xray.sites import site_name

    quiet_expected_failures()
    registry = config.registry.model_copy(update={"experiment_name": config.evaluate.site_experiment_name})
    name = site_name(dataset_uri, site)
    ensure_experiment(registry)
    run = evaluation_pipeline.with_options(enable_cache=False, settings=tracker_settings(registry))(
        dataset_uri=dataset_uri,
        site=name,
        model_version=model_version,
        recalibrate_fraction=recalibrate_fraction,
        data=config.data,
        s3=config.s3,
        evaluate=config.evaluate,
        registry=registry,
        seed=config.seed,
    )
    with run_outputs(run) as (run, load):
        result = load("evaluate_on_site", "site_evaluation")
        info = load("resolve_model_version", "model_info")
    metrics = result["metrics"]
    summary = {
        "site": name,
        "model_version": info["version"],
        "model_uri": info["uri"],
        "images": metrics["images"],
        "threshold": metrics["threshold"],
        "metrics": {k: v for k, v in metrics.items() if k not in ("images", "threshold")},
        "mlflow_run_id": result["mlflow_run_id"],
        "pipeline_run_id": str(run.id),
        "mlflow_tracking_uri": registry.tracking_uri,
    }
    if "recalibrated" in result:
        recalibrated = result["recalibrated"]
        summary["recalibrated"] = {
            k: recalibrated[k] for k in ("fraction", "calibration_images", "measured_images", "calibration")
        } | {
            "threshold": recalibrated["metrics"]["threshold"],
            "metrics": {k: v for k, v in recalibrated["metrics"].items() if k not in ("images", "threshold")},
        }
    return summary


def on_stack(config, stack_name: str | None):
    """Activate the run's ZenML stack; the config's registry.tracking_uri becomes its tracker's URI, so that the steps'
    registry reads (and the summary) name the store the tracker logs to."""
    from infra.stacks import use_stack
    from xray import tracking

    explicit = bool(os.environ.get("MLFLOW_TRACKING_URI") or config.registry.tracking_uri)
    name, uri = use_stack(stack_name, tracking.tracking_uri(config.registry.tracking_uri), explicit)
    logger.info("ZenML stack: %s; MLflow: %s", name, uri)
    return config.model_copy(update={"registry": config.registry.model_copy(update={"tracking_uri": uri})})


def list_schedules() -> None:
    from zenml.client import Client

    schedules = Client().list_schedules(size=100).items
    if not schedules:
        emit("no schedules in the active ZenML project")
    for item in schedules:
        emit(f"{item.name}\tcron={item.cron_expression}\tactive={item.active}\tid={item.id}")
    emit(
        "delete one with: zenml pipeline schedule delete <name>; on SageMaker also delete the EventBridge schedule "
        "(aws scheduler delete-schedule --name <name>; docs/sagemaker.md)"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--pipeline",
    "pipeline_name",
    type=click.Choice(["training", "tuning", "inference", "monitoring", "evaluation"]),
    default="training",
    show_default=True,
    help="Which pipeline to run.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="YAML run config, validated against xray.config.PipelineConfig.",
)
@click.option(
    "--dataset-uri",
    default=None,
    help="training: the dataset archive, s3://bucket/key.zip, a local path or file://; overrides dataset_uri in "
    "the config; default: $CHEST_XRAY_ZIP, then ../shared/data/chest_xray_224.zip, then Kaggle "
    "(kagglehub). evaluation (required): a labelled site, a zip, folder or s3:// zip with NORMAL/ and "
    "PNEUMONIA/ folders at any depth.",
)
@click.option(
    "--site",
    default=None,
    help="evaluation: the site's name in tags and the model card (default: the archive's or folder's name).",
)
@click.option(
    "--recalibrate-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="evaluation: also re-fit calibration and threshold on this patient-grouped share of the site and "
    "measure on the rest.",
)
@click.option(
    "--images", default=None, help="inference, monitoring: a folder, a zip or an s3:// prefix of JPEG/PNG images."
)
@click.option(
    "--model-version",
    default="champion",
    show_default=True,
    help="inference, monitoring, evaluation: a registered version number or an alias of the model.",
)
@click.option(
    "--output",
    default=None,
    help="inference: the predictions file, .csv or .parquet, a path or s3:// (written as the images stream; "
    "Grad-CAM PNGs go beside a local one, else under outputs/; default outputs/predictions.csv). "
    "monitoring: a folder for report.html, report.json, plots and predictions.csv "
    "(default outputs/monitoring).",
)
@click.option(
    "--fail-on-drift",
    is_flag=True,
    help=f"monitoring: exit with code {DRIFT_EXIT_CODE} when drift is detected (after printing the summary).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="inference: keep the rows already in --output and predict only images whose content (SHA-256) is not "
    "there yet.",
)
@click.option(
    "--explain",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="inference: write Grad-CAM overlays for the first N readable images.",
)
@click.option(
    "--stack",
    "stack_name",
    default=None,
    help="The ZenML stack to run on (activated for this and later runs); its MLflow experiment tracker "
    "decides where runs and models go. Default: the active stack if it has an experiment tracker, "
    "else xray-local (local orchestrator and artifact store, MLflow on ./.mlflow). `team`: see "
    "README 'Team stack'.",
)
@click.option("--no-cache", is_flag=True, help="Run every step even when ZenML has a cached result.")
@click.option(
    "--schedule",
    "cron",
    default=None,
    help='Attach a schedule instead of running once, e.g. "cron(0 3 ? * MON *)" (AWS six-field syntax '
    "on SageMaker). Needs a stack whose orchestrator can schedule.",
)
@click.option(
    "--list-schedules", "show_schedules", is_flag=True, help="List the schedules of the active ZenML project and exit."
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Override the config's seed (val carve, shuffling, bootstrap): replicate runs of one recipe.",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Debug logs: the project's debug lines, third-party INFO, TensorFlow's C++ logs, and the traceback "
    "of every failure.",
)
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only on stderr; the JSON summary is unchanged.")
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default=None,
    help="Set the level explicitly (default info; -v is debug, -q is warning).",
)
@click.option(
    "--summary",
    "summary_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the one-line JSON summary to this file.",
)
def main(
    pipeline_name: str,
    config_path: Path,
    dataset_uri: str | None,
    images: str | None,
    model_version: str,
    output: str | None,
    fail_on_drift: bool,
    explain: int,
    resume: bool,
    no_cache: bool,
    cron: str | None,
    show_schedules: bool,
    summary_path: Path | None,
    seed: int | None = None,
    site: str | None = None,
    recalibrate_fraction: float | None = None,
    stack_name: str | None = None,
    verbose: bool = False,
    quiet: bool = False,
    log_level: str | None = None,
) -> None:
    """Train, evaluate and register the chest X-ray pneumonia classifier with ZenML and MLflow."""
    if verbose and quiet:
        fail("-v and -q contradict each other", 2)
    configure_logging(log_level or ("debug" if verbose else "warning" if quiet else "info"))
    from xray.config import load_config
    from xray.errors import ConfigError

    if show_schedules:
        list_schedules()
        return
    try:
        config = load_config(config_path, overrides={"seed": seed})
    except ConfigError as error:
        fail(str(error), 2)
    if pipeline_name in ("inference", "monitoring") and not images:
        fail(f"--pipeline {pipeline_name} needs --images (a folder, a zip or an s3:// prefix)", 2)
    if pipeline_name == "evaluation" and not dataset_uri:
        fail(
            "--pipeline evaluation needs --dataset-uri (a zip, a folder or an s3:// zip with NORMAL/ and PNEUMONIA/ "
            "folders)",
            2,
        )
    if resume and pipeline_name != "inference":
        fail("--resume belongs to --pipeline inference", 2)
    if pipeline_name != "evaluation" and (site or recalibrate_fraction is not None):
        fail("--site and --recalibrate-fraction belong to --pipeline evaluation", 2)
    try:
        config = on_stack(config, stack_name)
        if pipeline_name == "inference":
            output = output or "outputs/predictions.csv"
            summary = run_inference(config, images, model_version, output, explain, resume)
        elif pipeline_name == "monitoring":
            summary = run_monitoring(config, images, model_version, Path(output or "outputs/monitoring"))
        elif pipeline_name == "tuning":
            summary = run_tuning(config, dataset_uri, no_cache)
        elif pipeline_name == "evaluation":
            summary = run_evaluation(config, dataset_uri, model_version, site, recalibrate_fraction)
        else:
            summary = run_training(config, dataset_uri, no_cache, cron)
    except Exception as error:  # noqa: BLE001 - expected failures become one line, the rest keep a traceback
        known = expected_error(error)
        if known is None or VERBOSE:
            traceback.print_exc()
            fail(f"pipeline {pipeline_name} failed: {type(error).__name__}: {error}".splitlines()[0])
        fail(str(known).splitlines()[0], 2 if isinstance(known, ConfigError) else 1)
    line = json.dumps(summary, sort_keys=True)
    emit(line)
    if summary_path:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(line + "\n")
    if fail_on_drift and summary.get("drift_detected"):
        click.echo(
            f"error: drift detected: {summary['ood_images']} of {summary['readable']} images out of "
            f"distribution (p = {summary['p_value']:.3g}); report {summary['report']}",
            err=True,
        )
        sys.exit(DRIFT_EXIT_CODE)


if __name__ == "__main__":
    # Machine output on stdout, human output on stderr: the result stream keeps the real stdout, and everything else
    # that writes to file descriptor 1 (ZenML's console log, Keras, TensorFlow's C++ runtime, print) goes to stderr.
    sys.stdout.flush()
    RESULT_STREAM = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    main()
