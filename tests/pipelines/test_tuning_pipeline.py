"""The search end to end on the local stack (configs/tuning_smoke.yaml): three one-epoch trials as steps, the winner
picked on val AUC, trained, evaluated and registered through the gate; the MLflow parent run with a child per trial."""

import json

import pytest
import yaml

from support import MINI_ZIP, ROOT, isolated_env, require, run_command

pytestmark = pytest.mark.slow
REGISTRATION = ("load_gate_sets", "score_candidates", "decide_promotion", "register_and_promote")


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    home = tmp_path_factory.mktemp("tuning")
    env = isolated_env(home)
    config = ROOT / "configs" / "tuning_smoke.yaml"
    command = [ROOT / "run.py", "--pipeline", "tuning", "--config", config, "--dataset-uri", require(MINI_ZIP)]
    result = run_command(command, env, 1500, cwd=home)
    assert result.returncode == 0, result.stderr[-4000:]
    return env, json.loads(result.stdout.strip().splitlines()[-1])


def test_trials_are_steps_and_the_winner_is_the_best_on_val(search):
    _, summary = search
    trials = summary["tuning"]["trials"]
    assert [t["trial"] for t in trials] == [0, 1, 2] and all(t["status"] == "ok" for t in trials)
    assert len({json.dumps(t["overrides"], sort_keys=True) for t in trials}) == 3  # three different points
    best = max(trials, key=lambda t: (t["val_auc"], -t["trial"]))
    assert summary["tuning"]["winner"] == best["trial"] and summary["tuning"]["winner_val_auc"] == best["val_auc"]
    steps = summary["steps"]
    assert {f"train_trial_{i}" for i in range(3)} | {"select_trial", "train_model", *REGISTRATION} <= set(steps)
    assert set(steps.values()) == {"completed"}
    # Registered through the same gate as a training run.
    assert summary["model_version"] == "1" and summary["promotion_reason"] and "test_auc" in summary["metrics"]


def test_mlflow_has_a_child_run_per_trial_and_the_search_on_the_parent(search):
    from mlflow.tracking import MlflowClient

    env, summary = search
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    parent = client.get_run(summary["mlflow_run_id"])
    experiment = parent.info.experiment_id
    assert client.get_experiment(experiment).name == "chest-xray-tuning"
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {int(run.data.tags["trial"]): run for run in children}
    assert sorted(by_trial) == [0, 1, 2]
    for trial in summary["tuning"]["trials"]:
        child = by_trial[trial["trial"]]
        assert child.info.run_id == trial["mlflow_run_id"] and child.info.status == "FINISHED"
        assert child.data.metrics["val_auc"] == pytest.approx(trial["val_auc"])
        for key, value in trial["overrides"].items():
            assert float(child.data.params[key]) == pytest.approx(value)
        assert "epoch_val_auc" in child.data.metrics  # the curve, epoch by epoch
        assert child.data.params["model.image_size"] == "32"  # tuning.trial_values: the trials' cheaper proxy
    assert int(parent.data.params["tuning.winner_trial"]) == summary["tuning"]["winner"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tuning")}
    assert artifacts == {"tuning/space.json", "tuning/trials.csv", "tuning/winner.yaml"}
    winner = yaml.safe_load(open(client.download_artifacts(parent.info.run_id, "tuning/winner.yaml")))
    overrides = summary["tuning"]["trials"][summary["tuning"]["winner"]]["overrides"]
    assert winner["train"]["learning_rate"] == pytest.approx(overrides["train.learning_rate"])
    assert winner["model"]["dropout"] == pytest.approx(overrides["model.dropout"]) and "tuning" not in winner
    # The winner was trained with its own values (the parent run's params are the final training's).
    assert float(parent.data.params["model.dropout"]) == pytest.approx(overrides["model.dropout"])
    assert parent.data.params["model.image_size"] == "64" and winner["model"]["image_size"] == 64
