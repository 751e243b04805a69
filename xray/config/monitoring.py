"""``monitoring:``, out-of-distribution detection, drift, the prediction log and feedback."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from xray.config.base import Section


class MonitoringConfig(Section):
    """Out-of-distribution detection per image and drift per batch (docs/MONITORING.md)."""

    ood_alpha: float = Field(
        0.01,
        gt=0,
        le=0.2,
        description="Nominal share of in-distribution images flagged out of distribution: the "
        "threshold is the 1 - ood_alpha quantile of the combined detector statistic, fitted on val.",
    )
    content_components: int = Field(16, ge=1, le=256, description="Principal components of the content detector.")
    neighbours: int = Field(20, ge=1, description="Nearest training images the content score averages over.")
    aspect_ratio_tolerance: float = Field(
        1.5,
        ge=1,
        description="Aspect ratios beyond the train split's by more than this factor are out of distribution.",
    )
    drift_alpha: float = Field(0.01, gt=0, lt=1, description="Significance level of the batch-level drift test.")
    permutations: int = Field(1000, ge=100, description="Resamples of the MMD permutation test on the embeddings.")
    experiment_name: str = "chest-xray-monitoring"
    # Where every prediction is logged: <artifact store>/prediction_log, a folder, an s3:// prefix, or off.
    prediction_log: str = Field("artifact-store", description="artifact-store, a folder, an s3:// prefix or off.")
    feedback_period: Literal["day", "week", "month"] = "week"
    feedback_min_per_class: int = Field(
        20,
        ge=1,
        description="Labelled answers of each class an alert's metric is computed on (sensitivity: PNEUMONIA).",
    )
    feedback_experiment_name: str = "chest-xray-feedback"
