from pathlib import Path

import pytest
import yaml

from xray.config.pipeline import PipelineConfig
from xray.config_file import load_config, parse_config
from xray.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), PipelineConfig)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key"):
        parse_config({"train": {"epochz": 3}})


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"train": {"batch_size": -1}}, "train.batch_size"),
        ({"evaluate": {"min_sensitivity": 1.5}}, "evaluate.min_sensitivity"),
        ({"model": {"image_size": "big"}}, "model.image_size"),
        ({"expected_sha256": "abc"}, "expected_sha256"),
        ({"data": {"val_fraction": 0.9}}, "data.val_fraction"),
    ],
)
def test_impossible_values_name_the_field(raw, field):
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    assert field in str(error.value)


def test_flat_params_use_the_yaml_names():
    flat = PipelineConfig().flat_params()
    assert flat["train.batch_size"] == 32
    assert flat["train.augmentation.zoom"] == 0.1
    assert flat["evaluate.min_sensitivity"] == 0.95


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"train": {"epochs": 2}}))
    assert load_config(good, overrides={"dataset_uri": "s3://b/k.zip"}).dataset_uri == "s3://b/k.zip"


def test_the_limits_documented_are_the_limits_in_force():
    """The default config and the user guide's "Limits" table name every limit, at the code's defaults."""
    from support import ROOT
    from xray.config.limits import DecodeLimits, PacsLimits

    config = load_config(ROOT / "configs" / "training_local.yaml")
    assert config.inference.decode == DecodeLimits() and config.inference.pacs == PacsLimits()
    guide = (ROOT / "docs" / "USER_GUIDE.md").read_text()
    for section, limits in (("decode", DecodeLimits), ("pacs", PacsLimits)):
        for key in limits.model_fields:
            assert f"| `inference.{section}.{key}` |" in guide, key
