"""Every layer's fixtures: the environment of the suite (set before TensorFlow or ZenML is imported), temporary
files under pytest's folder, synthetic archives, and the small predictors and reference profile the unit tests of
serving and monitoring share. Helpers that are not fixtures: support.py; each layer's own fixtures: its conftest.py."""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from support import ROOT, SHARED_WORKER, radiograph_like, write_zip
from xray.environment import apply_defaults  # noqa: E402 - before TensorFlow or ZenML is imported

apply_defaults()
# The tests compare served, batch and Keras probabilities to 1e-5, so the model runs on Keras here and in every
# command they start (isolated_env); the OpenVINO runtime has its own tests (tests/xray/serving/test_runtimes.py, and one run
# in tests/pipelines/test_local_stack_serving.py that sets auto).
os.environ["XRAY_INFERENCE_RUNTIME"] = "keras"
# ZenML resolves step and cache-policy sources against a source root: the .zen folder's, else the main module's folder.
# A pytest-xdist worker's main module has no file and a fresh clone has no .zen, so the tests that import steps in
# process name the repository root (subprocesses get isolated_env(), without ZENML_* variables).
os.environ.setdefault("ZENML_CUSTOM_SOURCE_ROOT", str(ROOT))
# ZenML in this process (steps imported, run configurations validated) reads and writes a global configuration: the
# suite's own, never the developer's ~/.config/zenml and its active stack (subprocesses get isolated_env()'s).
os.environ["ZENML_CONFIG_PATH"] = str(ROOT / ".cache" / "zenml-tests")
os.environ["ZENML_ANALYTICS_OPT_IN"] = "false"


def pytest_configure(config):
    """Create (migrate) that ZenML store once, before pytest-xdist starts its workers: each worker imports the steps,
    which opens the store, and workers that all find no database migrate it at once and fail. Once per ZenML version
    (a marker beside the store): opening it costs the controller about 2 s before any worker starts."""
    from importlib.metadata import version

    home = Path(os.environ["ZENML_CONFIG_PATH"])
    marker, database = home / f".migrated-zenml-{version('zenml')}", home / "local_stores/default_zen_store/zenml.db"
    if not hasattr(config, "workerinput") and not (marker.is_file() and database.is_file()):
        from zenml.client import Client

        Client().zen_store  # noqa: B018 - opening the store creates it
        marker.touch()


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's file scheduling, with the files of SHARED_WORKER counted as one file."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SHARED_WORKER.get(scope, scope)

    return SharedFixtureScheduling(config, log)


def pytest_unconfigure(config):
    """Freeze the heap that this process leaves behind: Python's exit collects it again and again while it tears the
    modules down, 2-5 s in a worker that imported TensorFlow, ZenML and MLflow (gdb: gc_collect_main under
    finalize_modules), which each run of the suite waited for. Frozen objects are left to the process's end."""
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_pytest(tmp_path_factory):
    """This process's temporary files (and its subprocesses') go under the session's pytest folder, of which pytest
    keeps the last three: a leak in a test or a library cannot pile up on a machine that runs the suite every day."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        patch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its first answer
        yield


@pytest.fixture(autouse=True)
def environment_as_found():
    """Each test leaves this process's environment as it found it: a command run in process (cli's configure_logging
    sets TF_CPP_MIN_LOG_LEVEL, ZENML_LOGGING_VERBOSITY) would otherwise change what every later test's commands get."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def scratch_tempdir(tmp_path, monkeypatch) -> Path:
    """An empty folder that this process's tempfile uses for the test: what is left in it afterwards, the code under
    test left behind."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def make_zip(tmp_path):
    counter = {"n": 0}

    def build(entries: dict[str, bytes]) -> Path:
        counter["n"] += 1
        return write_zip(tmp_path / f"archive{counter['n']}.zip", entries)

    return build


@pytest.fixture(scope="session")
def predictor():
    """A ChestXrayPredictor on 32 px with a tiny model and a reference profile fitted on radiograph-like images."""
    import keras

    from xray.monitoring import ood
    from xray.serving.predictor import ChestXrayPredictor

    rng = np.random.default_rng(0)
    features = [ood.features_of_array(radiograph_like(rng)) for _ in range(80)]
    profile = ood.fit_profile(features[:50], features[50:], np.full(30, 0.4), 0.5)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255.0),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    return ChestXrayPredictor(model, 0.5, 32, "7", profile)


@pytest.fixture(scope="session")
def explainable_predictor(predictor):
    """The test predictor's threshold and size on a model Grad-CAM can explain (a conv layer, "pool" and the
    "probability" head of xray.model.network's classifiers), without a reference profile: every image in scope is ok
    (the profile's synthetic chests find the suite's real radiographs out of distribution)."""
    import keras

    from xray.serving.predictor import ChestXrayPredictor

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(keras.layers.Rescaling(1 / 255.0)(inputs))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="probability")(pooled))
    return ChestXrayPredictor(model, predictor.threshold, 32, predictor.version)


@pytest.fixture(scope="session")
def family():
    """300 images: 0-159 train, 160-219 val of the profile below, 220-299 fresh ones from the same source."""
    rng = np.random.default_rng(0)
    return [radiograph_like(rng) for _ in range(300)]


@pytest.fixture(scope="session")
def profile(family):
    from xray.monitoring import ood

    features = [ood.features_of_array(image) for image in family]
    return ood.fit_profile(features[:160], features[160:220], np.linspace(0, 1, 60), 0.5, alpha=0.01)
