"""What the config promises outside the code, pinned: its keys and defaults (the YAML files), the MLflow param names
(``flat_params``), the JSON schema (types, bounds, descriptions) and the one-line messages of an invalid config.
Moving a class between modules must leave all of them as they are; changing one on purpose means regenerating the
record with ``.venv/bin/python tests/xray/core/test_config_contract.py`` and committing the diff with the change."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from xray.config.pipeline import PipelineConfig
from xray.config_file import parse_config, with_values
from xray.errors import ConfigError

RECORD = Path(__file__).with_name("config_contract.json")
SPACE = {"train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}
# One invalid config per validator and per kind of bound (a field's, a section's, the search space's checks).
INVALID = {
    "unknown key": {"train": {"epochz": 3}},
    "negative batch": {"train": {"batch_size": -1}},
    "not a number": {"model": {"image_size": "big"}},
    "not a choice": {"train": {"mixed_precision": "maybe"}},
    "digest": {"expected_sha256": "abc"},
    "no archive source": {"data": {"sources": [{"site": "a", "uri": "s3://b/a.zip"}]}},
    "repeated site": {"data": {"sources": [{"site": "a"}, {"site": "A", "uri": "s3://b/a.zip"}]}},
    "archive with labels": {"data": {"sources": [{"site": "a", "labels": "labels.csv"}]}},
    "site name": {"data": {"sources": [{"site": "bad name!"}]}},
    "split fraction": {"data": {"split": {"val": 0.6}}},
    "archive limit": {"data": {"limits": {"max_entries": 0}}},
    "decode limits": {"inference": {"decode": {"max_image_pixels": 300_000_000}}},
    "pacs limit": {"inference": {"pacs": {"deadline_s": 0}}},
    "inference window": {"inference": {"window": 0}},
    "scope ages": {"scope": {"age_years": [5, 1]}},
    "scope tag": {"scope": {"required": ["Foo"]}},
    "scope empty": {"scope": {"modalities": []}},
    "margin": {"registry": {"margin": 0.7}},
    "ood alpha": {"monitoring": {"ood_alpha": 0.5}},
    "calibration": {"evaluate": {"calibration": "isotonic"}},
    "augmentation": {"train": {"augmentation": {"zoom": 1.5}}},
    "zenml": {"zenml": "not a mapping"},
    "range below low": {"tuning": {"space": {"train.learning_rate": {"low": 1, "high": 0.5}}}},
    "no choices": {"tuning": {"space": {"model.backbone": {"choices": []}}}},
    "empty space": {"tuning": {"space": {}}},
    "not a hyperparameter": {"tuning": {"space": {"seed": {"low": 1, "high": 2}}}},
    "log range at zero": {"tuning": {"space": {"train.learning_rate": {"low": 0, "high": 1, "log": True}}}},
    "range end invalid": {"tuning": {"space": {"model.image_size": {"low": 8, "high": 64, "integer": True}}}},
    "choice invalid": {"tuning": {"space": {"model.backbone": {"choices": ["resnet50v2", "vgg"]}}}},
    "trial value": {"tuning": {"space": SPACE, "trial_values": {"model.nope": 1}}},
    "trials": {"tuning": {"space": SPACE, "trials": 0}},
}


def _message(raw: dict) -> str:
    try:
        parse_config(raw)
    except ConfigError as error:
        return str(error)
    raise AssertionError(f"{raw} was accepted")


def observed() -> dict:
    default = PipelineConfig()
    tuned = parse_config({"tuning": {"space": SPACE | {"model.backbone": {"choices": ["resnet50v2"]}}}})
    try:
        with_values(default, {"train.nope": 1})
    except ConfigError as error:
        override = str(error)
    return {
        "defaults": default.model_dump(mode="json"),
        "flat_params": default.flat_params(),
        "tuning": tuned.tuning.model_dump(mode="json"),
        "schema": PipelineConfig.model_json_schema(),
        "messages": {name: _message(raw) for name, raw in INVALID.items()} | {"override": override},
    }


def test_keys_defaults_params_schema_and_messages_are_the_recorded_ones():
    recorded, now = json.loads(RECORD.read_text()), json.loads(json.dumps(observed()))
    for part in recorded:
        assert now[part] == recorded[part], f"the config's {part} changed (see this module's docstring)"
    assert now.keys() == recorded.keys()


def test_the_default_dump_is_plain_python_in_the_yaml_shape():
    """The dump in Python mode (tuples, None) matches the JSON one key for key: what a step hashes and the YAML has."""
    dump = PipelineConfig().model_dump()
    assert json.loads(json.dumps(dump)) == json.loads(RECORD.read_text())["defaults"]
    assert PipelineConfig.model_validate(dump) == PipelineConfig()


if __name__ == "__main__":
    RECORD.write_text(json.dumps(observed(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}", file=sys.stderr)
