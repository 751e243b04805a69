"""Command line: parse flags, load and validate the config, launch the pipeline (pipelines/launch.py), print.

python3 run.py --pipeline training [--config PATH] [--dataset-uri URI] [--no-cache] [--summary PATH]
              [--schedule CRON] [--list-schedules] [--if-changed]
python3 run.py --pipeline tuning --config configs/tuning_smoke.yaml [--dataset-uri URI] [--no-cache]
python3 run.py --pipeline inference --images PATH|s3://prefix|dicomweb://HOST:PORT/dicom-web [--model-version champion|N]
              [--output preds.csv|preds.parquet|s3://bucket/preds.parquet] [--resume] [--explain N] [--write-back]
              [--site NAME] [--shards N]
python3 run.py --pipeline monitoring --images DIR|ZIP|s3://prefix [--model-version champion|N]
              [--output outputs/monitoring] [--fail-on-drift]
python3 run.py --pipeline evaluation --dataset-uri ZIP|DIR|s3://...zip [--model-version champion|N]
              [--site NAME] [--recalibrate-fraction F]
python3 run.py --pipeline feedback --labels FILE.csv [--site NAME] [--period day|week|month]
              [--output outputs/feedback] [--fail-on-degradation]
python3 run.py approve|reject --model-version N --reviewer NAME --reason TEXT     (registry.require_approval)
python3 run.py approve --model-version N --operating-point SITE:ID --reason TEXT  (a site's proposed operating point)
python3 run.py rollback --to N --reviewer NAME --reason TEXT
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent

from xray.environment import use_project_environment  # noqa: E402 - the standard library only, before the rest

if __name__ == "__main__":
    use_project_environment(__file__, ("click", "tensorflow", "zenml"))

import click  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "training_local.yaml"
DRIFT_EXIT_CODE = 3
DEGRADATION_EXIT_CODE = 4

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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("action", required=False, type=click.Choice(["approve", "reject", "rollback"]))
@click.option(
    "--pipeline",
    "pipeline_name",
    type=click.Choice(["training", "tuning", "inference", "monitoring", "evaluation", "feedback"]),
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
    "--reviewer",
    default=None,
    help="approve, reject, rollback: who decides (recorded with the version); on a tracking server with accounts, "
    "the signed-in MLFLOW_TRACKING_USERNAME is recorded instead.",
)
@click.option("--reason", default=None, help="approve, reject, rollback: why (recorded with the version).")
@click.option("--to", "to_version", default=None, help="rollback: the version that becomes champion again.")
@click.option(
    "--operating-point",
    "operating_point_site",
    default=None,
    help="approve SITE:ID: apply the operating point that --pipeline evaluation --recalibrate-fraction proposed for "
    "the site, with the ID its summary printed (where the run's account may not change a sealed version), instead "
    "of approving the version.",
)
@click.option(
    "--site",
    default=None,
    help="evaluation: the site's name in tags and the model card (default: the archive's or folder's name). "
    "inference: answer at that site's own operating point (calibration and threshold stored with the version). "
    "feedback: only that site's predictions.",
)
@click.option(
    "--shards",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="inference: N predict steps, each on its share of the images (a hash of each name), each writing its own "
    "part beside --output (preds.part-I-of-N.csv, kept for --resume), merged into --output at the end; on the "
    "SageMaker orchestrator each is its own job.",
)
@click.option(
    "--labels",
    default=None,
    help="feedback (required): a CSV with `label` (NORMAL or PNEUMONIA), `sha256` or `sop_instance_uid`, and "
    "optionally `read_at`.",
)
@click.option(
    "--period",
    type=click.Choice(["day", "week", "month"]),
    default=None,
    help="feedback: the period performance is computed per (default monitoring.feedback_period, week).",
)
@click.option(
    "--fail-on-degradation",
    is_flag=True,
    help=f"feedback: exit with code {DEGRADATION_EXIT_CODE} when a period degraded (after printing the summary).",
)
@click.option(
    "--recalibrate-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="evaluation: also re-fit calibration and threshold on this patient-grouped share of the site and "
    "measure on the rest.",
)
@click.option(
    "--images",
    default=None,
    help="inference, monitoring: a folder, a zip, an s3:// prefix of DICOM/JPEG/PNG images, or a PACS: "
    "dicomweb://HOST:PORT/dicom-web[?QIDO filters, e.g. ModalitiesInStudy=DX&StudyDate=20261101-] "
    "(credentials from XRAY_PACS_USER / XRAY_PACS_PASSWORD).",
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
    "(default outputs/monitoring). feedback: a folder for performance.csv, report.json, plots and the labelled "
    "images as training sources (default outputs/feedback).",
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
    "--write-back",
    is_flag=True,
    help="inference from a dicomweb:// PACS: store one DICOM Structured Report per analysed image in its study "
    "(a new series per model version); reports already there are not written again.",
)
@click.option(
    "--explain",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="inference: Grad-CAM of the N images most worth a look (the most confident PNEUMONIA calls and those "
    "nearest the threshold), captioned, with a colour bar, beside the predictions.",
)
@click.option(
    "--stack",
    "stack_name",
    default=None,
    help="The ZenML stack to run on (activated for this and later runs); its MLflow experiment tracker "
    "decides where runs and models go. Default: the active stack if it has an experiment tracker, "
    "else xray-local (local orchestrator and artifact store, MLflow on ./.mlflow). `team`: see "
    "docs/OPERATIONS.md 'Team stack'.",
)
@click.option("--no-cache", is_flag=True, help="Run every step even when ZenML has a cached result.")
@click.option(
    "--if-changed",
    is_flag=True,
    help="training: train only if the sources' content (data.sources digests) differs from the champion's "
    'training data; otherwise exit 0 with "skipped" in the summary. For scheduled retraining.',
)
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
    action: str | None,
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
    write_back: bool = False,
    if_changed: bool = False,
    reviewer: str | None = None,
    reason: str | None = None,
    to_version: str | None = None,
    labels: str | None = None,
    period: str | None = None,
    fail_on_degradation: bool = False,
    shards: int = 1,
    operating_point_site: str | None = None,
) -> None:
    """Train, evaluate and register the chest X-ray pneumonia classifier with ZenML and MLflow."""
    if verbose and quiet:
        fail("-v and -q contradict each other", 2)
    configure_logging(log_level or ("debug" if verbose else "warning" if quiet else "info"))
    from xray.config_file import load_config
    from xray.errors import ConfigError

    if show_schedules:
        from pipelines import launch

        for line in launch.schedules():
            emit(line)
        return
    try:
        config = load_config(config_path, overrides={"seed": seed})
    except ConfigError as error:
        fail(str(error), 2)
    if action is not None:
        if action == "rollback" and not to_version:
            fail("rollback needs --to N (the version that becomes champion again)", 2)
        if action != "rollback" and (to_version or model_version == "champion" or not model_version.isdigit()):
            fail(f"{action} needs --model-version N (a version number) and no --to", 2)
        if not reason:
            fail(f"{action} needs --reason TEXT (and --reviewer NAME where MLflow has no accounts)", 2)
        if operating_point_site and action != "approve":
            fail("--operating-point belongs to approve", 2)
        try:
            from pipelines import launch

            config = launch.on_stack(config, stack_name)
            summary = launch.decide(config, action, to_version or model_version, reviewer, reason, operating_point_site)
        except ConfigError as error:
            fail(str(error).splitlines()[0], 2)
        emit(json.dumps(summary, sort_keys=True))
        return
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
    if write_back and (pipeline_name != "inference" or not (images or "").startswith(("dicomweb://", "dicomwebs://"))):
        fail("--write-back belongs to --pipeline inference with --images dicomweb://HOST:PORT/ROOT (a PACS)", 2)
    if pipeline_name not in ("evaluation", "inference", "feedback") and site:
        fail("--site belongs to --pipeline evaluation, inference or feedback", 2)
    if shards > 1 and (pipeline_name != "inference" or explain):
        fail("--shards belongs to --pipeline inference, without --explain (Grad-CAM picks from one stream)", 2)
    if pipeline_name == "feedback" and not labels:
        fail("--pipeline feedback needs --labels FILE.csv (label, and sha256 or sop_instance_uid)", 2)
    if pipeline_name != "feedback" and (labels or period or fail_on_degradation):
        fail("--labels, --period and --fail-on-degradation belong to --pipeline feedback", 2)
    if pipeline_name != "evaluation" and recalibrate_fraction is not None:
        fail("--recalibrate-fraction belongs to --pipeline evaluation", 2)
    if if_changed and pipeline_name != "training":
        fail("--if-changed belongs to --pipeline training", 2)
    if if_changed and cron:
        fail(
            "--if-changed checks once, before a launch; a --schedule runs the pipeline itself, where unchanged sources "
            "make every step a cache hit and register nothing (README, 'Scheduled retraining')",
            2,
        )
    try:
        from pipelines import launch  # imports ZenML (and its log handlers), after the levels above are set

        quiet_expected_failures()
        config = launch.on_stack(config, stack_name)
        if pipeline_name == "inference":
            output = output or "outputs/predictions.csv"
            summary = launch.run_inference(
                config, images, model_version, output, explain, resume, write_back, site, shards
            )
        elif pipeline_name == "monitoring":
            summary = launch.run_monitoring(config, images, model_version, Path(output or "outputs/monitoring"))
        elif pipeline_name == "tuning":
            summary = launch.run_tuning(config, dataset_uri, no_cache)
        elif pipeline_name == "evaluation":
            summary = launch.run_evaluation(config, dataset_uri, model_version, site, recalibrate_fraction)
        elif pipeline_name == "feedback":
            summary = launch.run_feedback(config, labels, period, site, Path(output or "outputs/feedback"))
        else:
            summary = launch.run_training(config, dataset_uri, no_cache, cron, if_changed)
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
    if fail_on_degradation and summary.get("alerts"):
        for alert in summary["alerts"]:
            click.echo(f"error: {alert}", err=True)
        sys.exit(DEGRADATION_EXIT_CODE)


def cli() -> None:
    """``python3 run.py`` and the ``xray`` console script (pyproject.toml). Machine output on stdout, human output on
    stderr: the result stream keeps the real stdout, and everything else that writes to file descriptor 1 (ZenML's
    console log, Keras, TensorFlow's C++ runtime, print) goes to stderr."""
    global RESULT_STREAM
    sys.stdout.flush()
    RESULT_STREAM = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    main()


if __name__ == "__main__":
    cli()
