"""Thin ZenML steps: each calls the domain code in ``xray`` and declares typed outputs.

The package exports the training pipeline's steps, in its order, and imports each module only when one of them is
asked for: a command that runs no training (``run.py approve``, ``run.py audit``) does not load TensorFlow."""

import importlib

_TRAINING_STEPS = {
    "locate_archive": "steps.ingest",
    "locate_sources": "steps.ingest",
    "ingest_from_s3": "steps.ingest",
    "unzip_and_validate": "steps.prepare",
    "build_datasets": "steps.datasets",
    "train_model": "steps.train",
    "evaluate_model": "steps.evaluate",
    "profile_reference": "steps.profile",
    "load_gate_sets": "steps.register",
    "score_candidates": "steps.register",
    "decide_promotion": "steps.register",
    "quantize_int8": "steps.register",
    "register_and_promote": "steps.register",
}
__all__ = list(_TRAINING_STEPS)


def __getattr__(name: str):
    if name in _TRAINING_STEPS:
        return getattr(importlib.import_module(_TRAINING_STEPS[name]), name)
    raise AttributeError(f"module 'steps' has no attribute {name!r}")
