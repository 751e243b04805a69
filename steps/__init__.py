"""Thin ZenML steps: each calls the domain code in ``xray`` and declares typed outputs."""

from steps.datasets import build_datasets
from steps.evaluate import evaluate_model
from steps.ingest import ingest_from_s3, locate_archive, locate_sources
from steps.prepare import unzip_and_validate
from steps.profile import profile_reference
from steps.register import decide_promotion, load_gate_sets, register_and_promote, score_candidates
from steps.train import train_model

__all__ = [
    "locate_archive",
    "locate_sources",
    "ingest_from_s3",
    "unzip_and_validate",
    "build_datasets",
    "train_model",
    "evaluate_model",
    "profile_reference",
    "load_gate_sets",
    "score_candidates",
    "decide_promotion",
    "register_and_promote",
]
