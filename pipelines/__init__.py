"""The project's ZenML pipelines, one module per job, each with its ``run_<job>`` and summary; ``launch`` starts them.

The package imports none of them itself: a job's command (``run.py approve``, ``run.py audit``) imports only what it
runs, and the pipelines that need TensorFlow load it only when one of them runs."""

import importlib

_PIPELINES = {
    "training_pipeline": "pipelines.training",
    "inference_pipeline": "pipelines.inference",
    "monitoring_pipeline": "pipelines.monitoring",
    "evaluation_pipeline": "pipelines.evaluation",
}
__all__ = list(_PIPELINES)


def __getattr__(name: str):
    if name in _PIPELINES:
        return getattr(importlib.import_module(_PIPELINES[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
