"""The data layer's fixtures: the real archives of ../shared, validated once per session."""

from __future__ import annotations

import os

import pytest

from support import FULL_ZIP, require


@pytest.fixture(scope="session")
def full_dataset(tmp_path_factory):
    """The full archive, validated as the training pipeline does (seed 42): (dataset, report).

    Built once per test session, also under pytest-xdist: the first worker that needs it validates the archive into
    the session's shared temporary folder under a file lock, the others wait and load what it wrote.
    """
    import fcntl
    import pickle

    from xray.config.data import DataConfig
    from xray.data.dataset import prepare_dataset

    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    folder, done = shared / "full_dataset", shared / "full_dataset.pickle"
    with open(shared / "full_dataset.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            built = prepare_dataset(require(FULL_ZIP), folder / "d", DataConfig(), seed=42)
            done.write_bytes(pickle.dumps(built))
        return pickle.loads(done.read_bytes())
