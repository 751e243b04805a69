"""Reading a config: a YAML file or a mapping into the one :class:`xray.config.pipeline.PipelineConfig`, dotted
overrides (``with_values``) and the search space's checks. Every error is one :class:`xray.errors.ConfigError`
line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from xray.config.base import describe_error
from xray.config.pipeline import PipelineConfig
from xray.config.tuning import SearchChoice, SearchRange
from xray.errors import ConfigError


def parse_config(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"invalid {source}: {describe_error(error)}") from None
    if config.tuning is not None:
        _check_space(config, source)
    return config


def with_values(config: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """The config with dotted keys set (``{"train.learning_rate": 3e-4}``), validated like a YAML file."""
    tree = config.model_dump(mode="json")
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: not a key of the config")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{key}: not a key of the config")
        node[leaf] = value
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(describe_error(error)) from None


def _check_space(config: PipelineConfig, source: str) -> None:
    """Every key of the search space is a key of the config, and every end of its range or choice is a valid value."""
    for key, dimension in config.tuning.space.items():
        if key.split(".")[0] in ("tuning", "zenml", "registry", "s3", "seed", "dataset_uri", "expected_sha256"):
            raise ConfigError(f"invalid {source}: tuning.space.{key}: not a hyperparameter")
        values = dimension.choices if isinstance(dimension, SearchChoice) else [dimension.low, dimension.high]
        if isinstance(dimension, SearchRange) and dimension.log and dimension.low <= 0:
            raise ConfigError(f"invalid {source}: tuning.space.{key}: a log range needs low > 0")
        for value in values:
            if isinstance(dimension, SearchRange) and dimension.integer:
                value = int(round(value))
            try:
                with_values(config, {key: value})
            except ConfigError as error:
                raise ConfigError(f"invalid {source}: tuning.space.{key} = {value!r}: {error}") from None
    try:
        with_values(config, config.tuning.trial_values)
    except ConfigError as error:
        raise ConfigError(f"invalid {source}: tuning.trial_values: {error}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys, not {type(raw).__name__}")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_config(raw, source=f"config {path}")
