"""Two runs that finish together each register a version; promotions are serialised by the registry lock, so the
champion is exactly one of them and the other says why it was not promoted."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import keras, mlflow, numpy as np
    from mlflow.tracking import MlflowClient
    from xray.monitoring import ood
    from xray.registry import gate, promotion, store
    from xray.serving import bundle
    uri, auc, barrier = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
    mlflow.set_tracking_uri(uri)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")])
    with mlflow.start_run():
        metadata = {"threshold": 0.5, "image_size": 8, "preprocessing": "decode, resize"}
        rng = np.random.default_rng(0)
        images = [ood.features_of_array(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(12)]
        profile = ood.fit_profile(images[:8], images[8:], np.full(4, 0.5), 0.5)
        _, version = store.log_and_register(bundle.VersionFiles(model, profile), "race-model", metadata, "# card")
        # Both finish together: each says it is ready, then waits until both are.
        (barrier / f"ready-{auc}").touch()
        deadline = time.time() + 240
        while len(list(barrier.glob("ready-*"))) < 2:
            if time.time() > deadline:
                sys.exit("the other racer never got ready")
            time.sleep(0.001)
        metrics = {"test_auc": auc, "test_sensitivity": 0.97, "test_specificity": 0.5, "test_accuracy": 0.8, "threshold": 0.5}
        # Both read "no champion" before either registered: both pass the gate; the lock serialises the promotions.
        decision = gate.decide(0.97, 0.95, None, {}, 0.01)
        decision = promotion.promote(MlflowClient(), "race-model", version, "champion", metrics, decision)
    print("RESULT", version, decision.promoted, flush=True)
""")


def test_concurrent_registrations(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    # The store's default experiment keeps its artifacts under ./mlruns of whoever creates it: not the repository.
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_registered_model(
        "race-model"
    )  # both racers need the model row; creating it is not the race
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    racers = {
        auc: subprocess.Popen(
            [sys.executable, "-c", SCRIPT, uri, str(auc), str(barrier)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for auc in (0.90, 0.95)
    }
    results = {}
    for auc, process in racers.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
        line = [l for l in output.splitlines() if l.startswith("RESULT")][-1].split()
        results[auc] = (line[1], line[2])
    assert len({version for version, _ in results.values()}) == 2, "each run registers its own version"
    promoted = [version for version, won in results.values() if won == "True"]
    assert len(promoted) == 1, results  # one promotion took the alias; the other saw it move and stood down
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("race-model", "champion").version) == promoted[0]
    loser = next(version for version, won in results.values() if won == "False")
    tags = client.get_model_version("race-model", loser).tags
    assert (
        tags["promotion_decision"] == "rejected" and f"the champion became v{promoted[0]}" in tags["promotion_reason"]
    )
    assert not client.search_registered_models("name = 'race-model.promotion-lock'"), "the lock is released"


def test_the_promotion_lock_is_exclusive_released_on_errors_and_broken_when_stale(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from xray.registry.store import promotion_lock

    monkeypatch.chdir(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with promotion_lock(client, "m"):
        assert client.get_registered_model("m.promotion-lock")
        with pytest.raises(TimeoutError, match="still held"):
            with promotion_lock(client, "m", timeout_s=0.5):
                pass
    with pytest.raises(RuntimeError, match="boom"):
        with promotion_lock(client, "m"):
            raise RuntimeError("boom")
    assert not client.search_registered_models("name = 'm.promotion-lock'")  # released despite the error
    client.create_registered_model("m.promotion-lock", description="held by a process that died")
    with promotion_lock(client, "m", stale_s=0.0):  # older than stale_s: broken, then taken
        assert "deleted on release" in client.get_registered_model("m.promotion-lock").description


def test_a_lock_taken_and_released_during_our_insert_is_tried_again():
    """MLflow's SQL store turns a lost insert race into a read of the winner's row; when the winner has released the
    lock meanwhile, that read fails with RESOURCE_DOES_NOT_EXIST: the lock must be tried again, not fail the run."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from xray.registry.store import promotion_lock

    class Store:
        def __init__(self):
            self.models, self.creates = set(), 0

        def create_registered_model(self, name, description=""):
            self.creates += 1
            if self.creates == 1:  # lost the race to a holder that has already released the lock
                raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)
            self.models.add(name)

        def delete_registered_model(self, name):
            self.models.remove(name)

    store = Store()
    with promotion_lock(store, "m", poll_s=0.01):
        assert store.models == {"m.promotion-lock"}
    assert store.creates == 2 and not store.models
