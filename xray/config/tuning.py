"""``tuning:``, the hyperparameter search of ``--pipeline tuning``: its trials and its space."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from xray.config.base import Section, describe_error


class SearchRange(Section):
    """A numeric range of the search space; ``log`` samples evenly in log space, ``integer`` rounds."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    @field_validator("high")
    @classmethod
    def _above_low(cls, value: float, info) -> float:
        if "low" in info.data and value <= info.data["low"]:
            raise ValueError("must be above low")
        return value


class SearchChoice(Section):
    """Values to choose from, each equally likely."""

    choices: list[Any] = Field(..., min_length=1)


class TuningConfig(Section):
    """Hyperparameter search (``--pipeline tuning``): trials of the config's own keys, chosen on val AUC only."""

    trials: int = Field(6, ge=1, le=200)
    sampler: Literal["sobol", "random"] = Field(
        "sobol", description="sobol: scrambled quasi-random points that cover the space evenly; random: uniform."
    )
    epochs: int = Field(3, ge=1, description="Epochs per trial; the winner is then trained for train.epochs.")
    space: dict[str, SearchRange | SearchChoice] = Field(
        ...,
        min_length=1,
        description="Dotted config keys (train.learning_rate, model.dropout, train.augmentation.zoom, "
        "model.image_size, model.backbone, ...) to a range {low, high, log, integer} or {choices: [...]}.",
    )
    trial_values: dict[str, Any] = Field(
        default_factory=dict,
        description="Fixed values for the trials only, a cheaper proxy (model.image_size: 96); the winner is trained "
        "with the config's own values for these keys.",
    )
    experiment_name: str = "chest-xray-tuning"

    @field_validator("space", mode="before")
    @classmethod
    def _one_kind_each(cls, space: Any) -> Any:
        # A mapping with "choices" is a choice, any other a range: one error message per key, not one per union member.
        if not isinstance(space, dict):
            return space
        parsed = {}
        for key, value in space.items():
            kind = SearchChoice if isinstance(value, dict) and "choices" in value else SearchRange
            try:
                parsed[key] = kind.model_validate(value)
            except ValidationError as error:
                raise ValueError(f"{key}: {describe_error(error)}") from None
        return parsed
