"""``evaluate:``, the threshold policy, bootstrap, calibration and the site evaluations."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from xray.config.base import Section


class EvaluateConfig(Section):
    threshold_policy: Literal["min_sensitivity", "youden", "fixed"] = "min_sensitivity"
    min_sensitivity: float = Field(0.95, gt=0, le=1)
    fixed_threshold: float = Field(0.5, gt=0, lt=1)
    bootstrap_samples: int = Field(1000, ge=100)
    calibration: Literal["platt", "temperature", "none"] = Field(
        "platt",
        description="Fitted on val after training and saved inside the model: platt (temperature and bias), "
        "temperature (temperature only) or none. The threshold policy then runs on calibrated val probabilities.",
    )
    site_experiment_name: str = Field(
        "chest-xray-evaluation", description="MLflow experiment of `--pipeline evaluation` runs (one per site)."
    )
    min_recalibration_per_class: int = Field(
        30,
        ge=2,
        description="Images of each class a site's own operating point is fitted on at least (--recalibrate-fraction"
        "'s share, a site's val at training); docs/USER_GUIDE.md says why.",
    )
