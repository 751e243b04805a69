"""What the command line prints and how: one JSON summary line on the real stdout, everything human on stderr, log
levels set before ZenML or TensorFlow is imported, and expected failures as one ``error:`` line."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import NoReturn

import click

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
PROJECT_LOGGERS = ("run", "cli", "xray", "steps", "pipelines", "infra", "materializers")


class State:
    """The process's output settings: the result stream (the real stdout, when run as a script) and -v."""

    result_stream = None
    verbose = False


def emit(line: str) -> None:
    click.echo(line, file=State.result_stream or sys.stdout)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def configure_logging(level: str, tensorflow: bool = True) -> None:
    """Before ZenML or TensorFlow is imported: the project's loggers at ``level``, ZenML's at ``level``,
    third-party noise at WARNING (INFO with debug), and TensorFlow imported now with its banner dropped unless debug
    (``tensorflow``: the job loads it; a person's decision or the audit does not, and starts in seconds)."""
    State.verbose = level == "debug"
    numeric = getattr(logging, level.upper())
    os.environ["ZENML_LOGGING_VERBOSITY"] = level.upper()
    # MLflow sets its own logger's level when imported, from this variable.
    os.environ["MLFLOW_LOGGING_LEVEL"] = (
        "INFO" if State.verbose else logging.getLevelName(max(numeric, logging.WARNING))
    )
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if State.verbose else os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.INFO if State.verbose else max(numeric, logging.WARNING))
    # After every step ZenML's MLflow tracker disables autologging for frameworks this project never autologs, and
    # warns about fastai (not installed); nothing to act on.
    logging.getLogger("zenml.integrations.mlflow.experiment_trackers.mlflow_experiment_tracker").addFilter(
        lambda record: not record.getMessage().startswith("Failed to disable MLflow autologging")
    )
    if tensorflow and not State.verbose:
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


def expected_error(error: BaseException | None):
    """The XrayError behind a failure, however deep ZenML wrapped it."""
    from xray.errors import XrayError

    seen: set[int] = set()
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
    if State.verbose:  # -v: ZenML's traceback of the failed step stays
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(HideExpectedTracebacks())
