#!/usr/bin/env python3
"""The command line: ``python3 run.py <job> [options]`` (or ``./run.py``, or ``.venv/bin/xray``).

    python3 run.py --help                     the jobs: train, tune, infer, monitor, evaluate, feedback, approve, reject,
                                              rollback, audit (verify, show, approve-plan), schedules
    python3 run.py infer --help               one job's options
    python3 run.py --pipeline training ...    the form of earlier releases: the same job, the same options

This file only finds the project's environment and hands over to cli/ (cli/app.py lists the commands; each builds
one request, xray/requests.py, for its pipeline's launch in pipelines/).
"""

from __future__ import annotations

import atexit
import gc
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def use_project_environment() -> None:
    """``python3 run.py`` from any Python: an interpreter without the project's packages re-runs the same command in
    the project's ``.venv`` (make setup creates it), or says how to create it."""
    if all(importlib.util.find_spec(name) for name in ("click", "tensorflow", "zenml")):
        return
    python = VENV / "bin" / "python"
    if python.is_file() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.stderr.write(
        f"error: {sys.executable} lacks the project's packages (tensorflow, zenml) and there is no {python}: "
        "run `make setup` first (or `make train`, which installs it too)\n"
    )
    sys.exit(2)


if __name__ == "__main__":
    use_project_environment()

# Before TensorFlow or ZenML is imported anywhere (xray/environment.py says why each is set).
from xray.environment import apply_defaults  # noqa: E402

apply_defaults()

from cli.app import main  # noqa: E402
from cli.output import State  # noqa: E402


def cli() -> None:
    """``python3 run.py`` and the ``xray`` console script (pyproject.toml). Machine output on stdout, human output on
    stderr: the result stream keeps the real stdout, and everything else that writes to file descriptor 1 (ZenML's
    console log, Keras, TensorFlow's C++ runtime, print) goes to stderr."""
    # At exit Python collects the heap again and again while it tears the modules down: 2-5 s of CPU in a process
    # that imported TensorFlow, ZenML and MLflow. Frozen (after every exit handler the command registers), the heap is
    # left to the process's end; what a command writes is flushed or closed before (click.echo flushes, logging's
    # exit handler closes its files).
    atexit.register(gc.freeze)
    if not any(arg in ("-h", "--help") for arg in sys.argv[1:]):  # help runs no job: it is the command's output
        sys.stdout.flush()
        State.result_stream = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    main()


if __name__ == "__main__":
    cli()
