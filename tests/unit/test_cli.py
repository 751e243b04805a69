"""run.py's argument handling, with the pipeline launch replaced by a recorder."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from xray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "training_smoke.yaml"


@pytest.fixture
def launched(monkeypatch):
    import run

    calls = []
    monkeypatch.setattr(run, "run_training", lambda config, *args: calls.append(config) or {"seed": config.seed})
    return run, calls


def test_seed_flag_overrides_the_config_seed(launched):
    run, calls = launched
    result = CliRunner().invoke(run.main, ["--config", str(SMOKE), "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert calls[0].seed == 7
    assert calls[0].model_dump(exclude={"seed"}) == load_config(SMOKE).model_dump(exclude={"seed"})


def test_without_the_flag_the_yaml_seed_stands(launched):
    run, calls = launched
    result = CliRunner().invoke(run.main, ["--config", str(SMOKE)])
    assert result.exit_code == 0, result.output
    assert calls[0].seed == yaml.safe_load(SMOKE.read_text()).get("seed", 42) != 7


def test_seed_must_be_an_integer(launched):
    run, calls = launched
    result = CliRunner().invoke(run.main, ["--config", str(SMOKE), "--seed", "seven"])
    assert result.exit_code == 2 and "is not a valid integer" in result.output and not calls
