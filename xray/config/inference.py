"""``inference:``, the batch stream's sizes and runtime, and what a decode and a PACS may cost."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from xray.config.base import Section
from xray.config.limits import DecodeLimits, PacsLimits


class InferenceConfig(Section):
    """Batch inference and monitoring: one stream from the source to the predictions file (xray/serving/batch.py)."""

    batch_size: int = Field(32, ge=1, le=1024, description="Images per compiled model call.")
    fetch_workers: int = Field(
        8, ge=1, le=64, description="Threads that fetch, decode and screen images ahead of the model."
    )
    window: int = Field(
        64,
        ge=1,
        le=4096,
        description="Images in flight between fetching and the model: with batch_size, what bounds memory.",
    )
    runtime: Literal["auto", "keras", "openvino"] = Field(
        "auto",
        description=(
            "What runs the model: auto is the faster of the version's int8 and OpenVINO bf16 in a warm-up where the "
            "version carries one and the CPU has BF16, else whichever of them there is, else Keras (predictor.py)."
        ),
    )
    decode: DecodeLimits = DecodeLimits()
    pacs: PacsLimits = PacsLimits()
    experiment_name: str = "chest-xray-inference"
