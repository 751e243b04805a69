"""``change_plan:``, the predetermined change control plan: its version, the modifications a new version may make
(retraining on new data from listed sites, recalibration, an operating point moved within bounds, hyperparameters
within ranges), those it may not (backbone, input size, normalization, scope, label set, preprocessing) and the
acceptance criteria that then decide (xray.registry.control.plan). Absent: the gate of ``registry:`` alone."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from xray.config.base import Section

FIXED_KEYS = {
    "backbone": ("model.backbone", "model.weights"),
    "input size": ("model.image_size",),
    "normalization": ("model.input_normalization",),
    "scope": ("scope.",),
    "label set": ("classes",),
    "preprocessing": ("preprocessing",),
}
"""The modifications a plan may forbid, in the words of the FDA's PCCP guidance, and the keys of a version's record
that make each (a key ending in a dot: every key below it)."""
FIXED = tuple(FIXED_KEYS)


class Allowed(Section):
    """A key's allowed values: a closed range ``[low, high]`` or ``choices``."""

    low: float | None = None
    high: float | None = None
    choices: tuple[str | float | int | bool, ...] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        ranged = self.low is not None and self.high is not None
        if ranged == (self.choices is not None) or (self.low is None) != (self.high is None):
            raise ValueError("give either low and high, or choices")
        if ranged and self.low > self.high:
            raise ValueError(f"low {self.low:g} > high {self.high:g}")
        if self.choices is not None and not self.choices:
            raise ValueError("choices is empty")
        return self


class Criteria(Section):
    """The acceptance criteria of a change inside the plan: they are the promotion gate's."""

    min_sensitivity: float = Field(0.95, gt=0, le=1, description="Test sensitivity at the val-chosen threshold.")
    margin: float = Field(
        0.01, ge=0, lt=0.5, description="Non-inferiority margin on the whole test split (paired 95% CI lower bound)."
    )
    site_margin: float = Field(
        0.02, ge=0, lt=0.5, description="Non-inferiority margin on each site's share of test and each gate site."
    )
    subgroup_margin: float = Field(
        0.03,
        ge=0,
        lt=0.5,
        description="Non-inferiority margin on each DICOM subgroup of test (registry.gate_subgroups).",
    )
    max_ece: float = Field(
        0.15,
        gt=0,
        le=1,
        description="ECE bound on each site's test share at the site's own operating point (calibration fitted on "
        "its own val); sites without one are listed as not measured.",
    )


class ChangePlanConfig(Section):
    version: int = Field(
        1, ge=1, description="Raise it with every edit; a new version governs once a reviewer approves."
    )
    sites: tuple[str, ...] = Field(
        ("guangzhou",), description="Retraining on new data from these data.sources sites is allowed."
    )
    recalibration: tuple[Literal["platt", "temperature", "none"], ...] = Field(
        ("platt", "temperature", "none"), description="evaluate.calibration methods a new version may switch between."
    )
    operating_point: dict[str, Allowed] = Field(
        default_factory=dict,
        description="evaluate.threshold_policy, evaluate.min_sensitivity, evaluate.fixed_threshold: the values the "
        "operating point may move within.",
    )
    hyperparameters: dict[str, Allowed] = Field(
        default_factory=dict, description="Dotted config keys (train.epochs, ...) and the values they may take."
    )
    code_changes: bool = Field(
        True, description="The domain code's version may differ from the champion's (it is always listed)."
    )
    not_allowed: tuple[Literal[FIXED], ...] = Field(FIXED, description="Modifications never made under this plan.")
    criteria: Criteria = Criteria()

    @model_validator(mode="after")
    def _keys_in_their_place(self):
        for key in self.operating_point:
            if key not in ("evaluate.threshold_policy", "evaluate.min_sensitivity", "evaluate.fixed_threshold"):
                raise ValueError(f"operating_point: {key} is not an operating point key")
        for key in self.hyperparameters:
            if key != "seed" and key.split(".")[0] not in ("model", "train", "data"):
                raise ValueError(f"hyperparameters: {key} is not seed or a dotted model, train or data key")
            fixed = [name for name in self.not_allowed if category_of(key) == name]
            if fixed:
                raise ValueError(f"hyperparameters: {key} is a {fixed[0]} change, which not_allowed lists")
        return self


def category_of(key: str) -> str | None:
    """The fixed modification a record key makes (``model.image_size``: input size), or None."""
    for name, keys in FIXED_KEYS.items():
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys):
            return name
    return None
