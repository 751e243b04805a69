import pytest

from xray.errors import DatasetSourceError
from xray.storage import sources


def test_precedence(tmp_path, monkeypatch):
    shared = tmp_path / "shared.zip"
    shared.write_bytes(b"x")
    env_zip = tmp_path / "env.zip"
    env_zip.write_bytes(b"y")
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.setenv(sources.ENV_VAR, str(env_zip))
    assert sources.resolve("s3://b/k.zip", shared) == sources.DatasetSource("s3://b/k.zip", "explicit")
    assert sources.resolve(None, shared).origin == "env"
    monkeypatch.delenv(sources.ENV_VAR)
    assert sources.resolve(None, shared) == sources.DatasetSource(str(shared), "shared")
    with pytest.raises(DatasetSourceError, match="no dataset archive found"):
        sources.resolve(None, tmp_path / "missing.zip")


def test_env_var_pointing_nowhere(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "gone.zip"))
    with pytest.raises(DatasetSourceError, match="not a file"):
        sources.resolve(None, tmp_path / "missing.zip")
