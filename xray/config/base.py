"""What every section shares: a frozen model that refuses unknown keys; the dotted names of a dumped config
(``flatten``, MLflow's params) and the one-line message of a validation error (``describe_error``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    """A section of the config (and the config itself): frozen, and a key it does not know is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def describe_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        parts.append(f"{field}: {message}")
    return "; ".join(parts)
