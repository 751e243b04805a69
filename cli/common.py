"""What every command shares: the options of any job (config, stack, seed, summary file, verbosity) and the one way a
job runs: logging set up, the config loaded, the request built and validated, the stack chosen, the job launched,
its summary printed, and an expected failure turned into one ``error:`` line."""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path
from typing import Callable

import click

from cli.output import LOG_LEVELS, State, configure_logging, emit, expected_error, fail, quiet_expected_failures

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "training_local.yaml"
DRIFT_EXIT_CODE = 3
DEGRADATION_EXIT_CODE = 4
AUDIT_BROKEN_EXIT_CODE = 5


def job_options(function: Callable) -> Callable:
    """The options every command takes, added after its own (so its --help lists its own first)."""
    options = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False, path_type=Path),
            default=DEFAULT_CONFIG,
            show_default=True,
            help="YAML run config, validated against xray.config.pipeline.PipelineConfig.",
        ),
        click.option(
            "--stack",
            "stack_name",
            default=None,
            help="The ZenML stack to run on (activated for this and later runs); its MLflow experiment tracker "
            "decides where runs and models go. Default: the active stack if it has an experiment tracker, else "
            "xray-local (local orchestrator and artifact store, MLflow on ./.mlflow). `team`: docs/OPERATIONS.md.",
        ),
        click.option(
            "--seed",
            type=int,
            default=None,
            help="Override the config's seed (val carve, shuffling, bootstrap): replicate runs of one recipe.",
        ),
        click.option(
            "--summary",
            "summary_path",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Also write the one-line JSON summary to this file.",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Debug logs, third-party INFO, every failure's traceback."),
        click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only on stderr; the summary unchanged."),
        click.option("--log-level", type=click.Choice(LOG_LEVELS), default=None, help="Set the level explicitly."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def run_job(
    options: dict, build: Callable, launcher: str, exit_code: Callable[[dict], int] = lambda s: 0, tensorflow=True
) -> None:
    """One job: ``build(config)`` makes its request (xray.requests), ``launcher`` (``module:function``, imported
    after logging is set) runs it and returns the summary; ``exit_code(summary)``: 0, or the code that says the job
    found something (drift, a degradation) after the summary was printed; ``tensorflow``: False for a job that never
    loads it (a decision, the audit), which then starts without its import."""
    from pydantic import ValidationError

    if options["verbose"] and options["quiet"]:
        fail("-v and -q contradict each other", 2)
    level = options["log_level"] or ("debug" if options["verbose"] else "warning" if options["quiet"] else "info")
    configure_logging(level, tensorflow)
    from xray.config_file import load_config
    from xray.errors import ConfigError
    from xray.requests import first_error

    try:
        config = load_config(options["config_path"], overrides={"seed": options["seed"]})
        request = build(config)
    except ConfigError as error:
        fail(str(error).splitlines()[0], 2)
    except ValidationError as error:
        fail(first_error(error), 2)
    module, name = launcher.split(":")
    try:
        from pipelines import launch  # imports ZenML (and its log handlers), after the levels above are set

        quiet_expected_failures()
        request = request.on(launch.on_stack(request.config, options["stack_name"]))
        summary = getattr(importlib.import_module(module), name)(request)
    except Exception as error:  # noqa: BLE001 - expected failures become one line, the rest keep a traceback
        known = expected_error(error)
        if known is None or State.verbose:
            traceback.print_exc()
            fail(f"{name} failed: {type(error).__name__}: {error}".splitlines()[0])
        fail(str(known).splitlines()[0], 2 if isinstance(known, ConfigError) else 1)
    line = summary if isinstance(summary, str) else json.dumps(summary, sort_keys=True)  # str: a listing
    emit(line)
    if options["summary_path"]:
        options["summary_path"].parent.mkdir(parents=True, exist_ok=True)
        options["summary_path"].write_text(line + "\n")
    code = exit_code(summary)
    if code:
        sys.exit(code)
