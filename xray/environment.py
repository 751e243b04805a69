"""The environment every entry point (run.py, tests, benchmarks) sets before TensorFlow or ZenML is imported.

    TF_ENABLE_ONEDNN_OPTS=1   oneDNN kernels: about twice the CPU training throughput on AVX2 (docs/BENCHMARKS.md)
    TF_CPP_MIN_LOG_LEVEL=2    TensorFlow's C++ INFO and WARNING lines off (run.py -v turns them back on)
    ZENML_ANALYTICS_OPT_IN=false  no usage analytics from an air-gapped hospital network
    MLFLOW_DISABLE_TELEMETRY=true the same for MLflow's usage telemetry (on by default since MLflow 3)

Values already in the environment win.
"""

import os
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
