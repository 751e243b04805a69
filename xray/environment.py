"""The environment every entry point (run.py, tests, benchmarks) sets before TensorFlow or ZenML is imported.

    TF_ENABLE_ONEDNN_OPTS=1   oneDNN kernels: about twice the CPU training throughput on AVX2 (docs/BENCHMARKS.md)
    TF_CPP_MIN_LOG_LEVEL=2    TensorFlow's C++ INFO and WARNING lines off (run.py -v turns them back on)
    ZENML_ANALYTICS_OPT_IN=false  no usage analytics from an air-gapped hospital network
    MLFLOW_DISABLE_TELEMETRY=true the same for MLflow's usage telemetry (on by default since MLflow 3)

Values already in the environment win. :func:`use_project_environment` is how ``python3 run.py`` and the scripts find
the project's ``.venv`` from any Python (this module imports nothing beyond the standard library, for that);
:func:`process_running` is how the prediction log's spools and the services' pid files (infra/pidfile.py) tell a
running process from an ended one.
"""

import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The repository (or installed project) root: the one place paths beside the code are built from (the local MLflow
store, ../shared, the cache key's source folders)."""

DEFAULTS = {
    "TF_ENABLE_ONEDNN_OPTS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "ZENML_ANALYTICS_OPT_IN": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def apply_defaults() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


def use_project_environment(script: str, needs: tuple[str, ...]) -> None:
    """``python3 <script>`` from any Python: an interpreter without the modules ``needs`` re-runs the same command in
    the project's ``.venv`` (make setup creates it), or says in one line how to create it. Called before the script
    imports what it needs."""
    if all(importlib.util.find_spec(name) for name in needs):
        return
    python = REPO_ROOT / ".venv" / "bin" / "python"
    if python.is_file() and Path(sys.prefix).resolve() != python.parent.parent.resolve():
        os.execv(str(python), [str(python), str(Path(script).resolve()), *sys.argv[1:]])
    sys.stderr.write(
        f"error: {sys.executable} lacks the project's packages ({', '.join(needs)}) and there is no {python}: run "
        "`make setup` first (or `make train`, which installs it too)\n"
    )
    sys.exit(2)


def process_running(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (ended, not reaped yet, as an orphaned server worker in a container) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
