"""Commands of the end-to-end tests forked from a process that has already imported the libraries every command
imports (TensorFlow, ZenML, MLflow, ...), instead of started from nothing: ``python run.py ...`` spends about 7 s of
CPU importing them before its first step, and the suite runs about a hundred such commands on 2 cores.

The command still runs as a process of its own: a fresh child of a fork server (multiprocessing's ``forkserver``,
started once per test process), with the command's arguments, environment, working folder, file descriptors 1 and 2
on files, run.py's ``__main__`` and an exit as Python's own (threads joined, atexit handlers, streams flushed). What
it shares with the others is only what those imports did, so a command is forked only where that cannot differ from a
fresh interpreter: its environment differs from the server's only in variables read when used (the stores, the
credentials, the project's own, TMPDIR), and a run.py command keeps the default log level (``-v``, ``-q`` and
``--log-level`` set ZenML's and TensorFlow's logging before their import, so those start a fresh interpreter).
``XRAY_TEST_FORK=0`` turns it off (every command a fresh interpreter).

This module imports only the standard library: the fork server imports it to find :func:`run_forked`.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

PRELOAD = [
    "numpy",
    "tensorflow",
    "keras",
    "zenml",
    "zenml.client",
    "zenml.zen_stores.sql_zen_store",
    "zenml.integrations.mlflow.experiment_trackers.mlflow_experiment_tracker",
    "zenml.deployers",  # what a pipeline run's stack validation imports
    "zenml.log_stores",
    "git",  # MLflow's run source reads the commit
    "mlflow",
    "mlflow.tracking",
    "mlflow.keras",
    "mlflow.pyfunc",
    "mlflow.store.tracking.sqlalchemy_store",  # every command on a SQLite or PostgreSQL store: 0.4 s each
    "mlflow.store.model_registry.sqlalchemy_store",
    "sklearn.metrics",
    "sklearn.linear_model",
    "scipy.stats",
    "scipy.optimize",
    "matplotlib",
    "matplotlib.pyplot",
    "pandas",
    "PIL.Image",
    "pydicom",
    "highdicom",
    "pynetdicom",
    "dicomweb_client",
    "boto3",
    "botocore.session",
    "pydantic",
    "sqlalchemy",
    "sqlmodel",
    "yaml",
    "click",
    "h5py",
]
# What run.py's default log level sets before ZenML, MLflow and TensorFlow are imported (cli/output.py): the server
# imports them under the same values.
IMPORT_SETTINGS = {"ZENML_LOGGING_VERBOSITY": "INFO", "MLFLOW_LOGGING_LEVEL": "WARNING"}
# Variables a command may set differently from the server: each is read when used, none while the libraries above
# are imported.
READ_WHEN_USED = re.compile(
    r"(TMPDIR|ZENML_CONFIG_PATH|ZENML_REPOSITORY_PATH|ZENML_ANALYTICS_OPT_IN|MLFLOW_TRACKING_URI|"
    r"MLFLOW_TRACKING_(USERNAME|PASSWORD)|AWS_[A-Z_0-9]+|XRAY_[A-Z_0-9]+|CHEST_XRAY_ZIP|PYTEST_CURRENT_TEST)"
)
# Set by the libraries above when imported, into the environment of the test process too (after a command's
# environment was copied from it): a command without them gets them from the same imports.
SET_BY_IMPORTS = {
    "TF2_BEHAVIOR",
    "KMP_DUPLICATE_LIB_OK",
    "KMP_INIT_AT_FORK",
    "TPU_ML_PLATFORM",
    "TPU_ML_PLATFORM_VERSION",
    "GDCM_RESOURCES_PATH",
    "HDF5_PLUGIN_PATH",
    "ENABLE_RUNTIME_UPTIME_TELEMETRY",
}
LOG_OPTIONS = ("-v", "--verbose", "-q", "--quiet", "--log-level")


def server_environment(environment: dict[str, str]) -> dict[str, str]:
    """The fork server's environment: the test process's without store, credential or ZenML settings (as a command's,
    support.isolated_env), plus the default log level's settings."""
    plain = {k: v for k, v in environment.items() if not k.startswith(("AWS_", "MLFLOW_", "ZENML_", "XRAY_"))}
    return plain | IMPORT_SETTINGS


class ForkServer:
    """One per test process, started on first use (about 10 s: the imports), gone with the process."""

    def __init__(self) -> None:
        self.context = None
        self.environment: dict[str, str] = {}
        self.path: list[str] = []
        self.lock = threading.Lock()

    def can_run(self, args: list[str], env: dict[str, str]) -> bool:
        """Only ``run.py`` at its default log level (which sets IMPORT_SETTINGS itself, whatever the environment
        says), with an environment that differs from the server's only in variables read when used."""
        if os.environ.get("XRAY_TEST_FORK", "1") == "0" or not args or not args[0].endswith("run.py"):
            return False
        if any(arg in LOG_OPTIONS or arg.startswith("--log-level=") for arg in args[1:]):
            return False
        base = self.environment or server_environment(dict(os.environ))
        differing = {k for k in env.keys() | base.keys() if env.get(k) != base.get(k)} - set(IMPORT_SETTINGS)
        differing -= {k for k in SET_BY_IMPORTS if k not in env}  # the command's own imports set them
        return all(READ_WHEN_USED.fullmatch(k) for k in differing)

    def start(self):
        with self.lock:
            if self.context is None:
                import multiprocessing

                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["forked", *PRELOAD])
                self.environment = server_environment(dict(os.environ))
                probe = subprocess.run(
                    [sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
                    env=self.environment,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                self.path = json.loads(probe.stdout)
                saved = dict(os.environ)
                os.environ.clear()
                os.environ.update(self.environment)
                try:
                    from multiprocessing import forkserver

                    forkserver.ensure_running()  # started with this environment
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
                self.context = context
        return self.context

    def run(self, args: list[str], env: dict[str, str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
        context = self.start()
        with tempfile.TemporaryDirectory(prefix="forked-") as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            process = context.Process(target=run_forked, args=(args, env, str(cwd), str(out), str(err), self.path))
            process.start()
            process.join(timeout)
            if process.exitcode is None:
                process.kill()
                process.join()
                raise subprocess.TimeoutExpired([sys.executable, *args], timeout, read(out), read(err))
            return subprocess.CompletedProcess([sys.executable, *args], process.exitcode, read(out), read(err))


def read(path: Path) -> str:
    return path.read_bytes().decode(errors="replace") if path.exists() else ""


SERVER = ForkServer()


def run_forked(args: list[str], env: dict[str, str], cwd: str, out: str, err: str, path: list[str]) -> None:
    """In the forked child: become ``python SCRIPT ARGS...`` (file descriptors 1 and 2 on the files ``out`` and
    ``err``) and exit as Python would."""
    # What the server imported lives as long as the command: frozen, the collector's full passes skip it. Each pass
    # over it took about 0.45 s and wrote to every page it holds, so that the child copied ~180 MB of the server's.
    gc.freeze()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for descriptor, name in ((1, out), (2, err)):
        opened = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(opened, descriptor)
        os.close(opened)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # gettempdir() caches its first answer: the command's TMPDIR, not the server's
    code: object = 0
    try:
        import runpy

        sys.argv, sys.path[:] = list(args), [str(Path(args[0]).resolve().parent), *path]
        runpy.run_path(args[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # noqa: BLE001 - as the interpreter: the traceback on stderr, exit code 1
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined] - as the interpreter does before atexit
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - a closed stream: nothing left to flush
                pass
        os._exit(code & 0xFF)
