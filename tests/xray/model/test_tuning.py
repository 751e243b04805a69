"""The search's recipe: the space validated like any key, seeded samples inside it, trials scored on val only, failed
and diverging trials skipped, and the SageMaker tuning config's trials on the step operator."""

import numpy as np
import pytest
import yaml

from support import ROOT
from xray.config_file import load_config, parse_config
from xray.errors import ConfigError
from xray.model import tuning

SPACE = {
    "train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
    "model.dropout": {"low": 0.1, "high": 0.5},
    "train.fine_tune_layers": {"low": 10, "high": 40, "integer": True},
    "model.backbone": {"choices": ["resnet50v2", "efficientnetv2b0"]},
}


def search(**changes):
    return parse_config({"tuning": {"trials": 8, "space": SPACE} | changes})


@pytest.mark.parametrize("sampler", ["sobol", "random"])
def test_samples_are_seeded_and_inside_the_space(sampler):
    config = search(sampler=sampler)
    trials = tuning.sample(config.tuning, seed=3)
    assert trials == tuning.sample(config.tuning, seed=3) and trials != tuning.sample(config.tuning, seed=4)
    assert len(trials) == 8 and all(set(t) == set(SPACE) for t in trials)
    rates = [t["train.learning_rate"] for t in trials]
    assert all(1e-4 <= r <= 1e-2 for r in rates) and min(rates) < 1e-3 < max(rates)  # log scale reaches both decades
    assert all(isinstance(t["train.fine_tune_layers"], int) and 10 <= t["train.fine_tune_layers"] <= 40 for t in trials)
    assert {t["model.backbone"] for t in trials} == {"resnet50v2", "efficientnetv2b0"}
    for trial in trials:  # every trial is a valid config
        assert tuning.trial_config(config, trial, trial=True).train.epochs == config.tuning.epochs


@pytest.mark.parametrize(
    "space, message",
    [
        ({"train.nope": {"low": 0, "high": 1}}, "train.nope: not a key of the config"),
        ({"model.dropout": {"low": 0.1, "high": 1.5}}, "model.dropout = 1.5"),
        ({"model.dropout": {"low": 0.5, "high": 0.1}}, "must be above low"),
        ({"train.learning_rate": {"low": 0, "high": 1, "log": True}}, "a log range needs low > 0"),
        ({"model.backbone": {"choices": ["vgg16"]}}, "model.backbone = 'vgg16'"),
        ({"registry.margin": {"low": 0, "high": 0.1}}, "not a hyperparameter"),
    ],
)
def test_a_bad_space_is_a_config_error_that_names_the_key(space, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_config({"tuning": {"space": space}})


def test_a_trial_config_applies_its_values_and_drops_the_search():
    config = search(epochs=1, trial_values={"model.image_size": 96})
    point = {"train.learning_rate": 3e-4, "model.backbone": "efficientnetv2b0"}
    trial = tuning.trial_config(config, point, trial=True)
    assert (trial.train.learning_rate, trial.model.backbone, trial.train.epochs) == (3e-4, "efficientnetv2b0", 1)
    assert trial.model.image_size == 96 and trial.tuning is None
    # The winner is trained with the point, on the config's own budget and image size.
    winner = tuning.trial_config(config, point)
    assert (winner.train.learning_rate, winner.train.epochs, winner.model.image_size) == (3e-4, 4, 128)
    assert config.train.learning_rate != 3e-4  # the search's config is unchanged
    with pytest.raises(ConfigError, match="tuning.trial_values: model.image_size"):
        search(trial_values={"model.image_size": 8})


def fake_training(loss, val_auc):
    return lambda: (None, {"loss": loss, "val_auc": val_auc}, {"train_seconds": 1.0})


def test_trials_are_scored_by_their_best_val_epoch_and_failures_are_recorded():
    ok = tuning.run_trial(fake_training([0.7, 0.5], [0.6, 0.8]))
    assert ok["status"] == "ok" and ok["val_auc"] == 0.8 and ok["best_epoch"] == 2
    diverged = tuning.run_trial(fake_training([0.7, float("nan")], [0.6, 0.5]))
    assert diverged["status"] == "failed" and "diverged" in diverged["error"]

    def broken():
        raise MemoryError("out of memory on the accelerator")

    crashed = tuning.run_trial(broken)
    assert crashed["status"] == "failed" and "MemoryError: out of memory" in crashed["error"]


def test_a_real_diverging_trial_fails_and_stops_early(monkeypatch):
    import keras
    import tensorflow as tf

    from support import one_layer_model
    from xray.config.model import ModelConfig
    from xray.config.train import Augmentation, TrainConfig
    from xray.data.inputs import DatasetSpec
    from xray.model import training

    monkeypatch.setattr(training, "build_model", one_layer_model)
    x = np.full((8, 32, 32, 3), np.nan, dtype="float32")  # a NaN input makes every loss NaN
    y = np.array([0, 1] * 4, dtype="float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    spec = DatasetSpec(
        image_size=32,
        batch_size=4,
        augmentation=Augmentation(),
        class_weights={0: 1.0, 1: 1.0},
        max_train_per_class=None,
        max_eval_per_class=None,
        seed=0,
        counts={"train": {"NORMAL": 4, "PNEUMONIA": 4}},
    )
    result = tuning.run_trial(
        lambda: training.fit(
            ModelConfig(image_size=32, dense_units=4),
            TrainConfig(epochs=3),
            spec,
            (ds, ds),
            extra_callbacks=[keras.callbacks.TerminateOnNaN()],
            log=lambda line: None,
        )
    )
    assert result["status"] == "failed" and "not finite" in result["error"]


def test_selection_uses_val_auc_only_and_skips_failed_trials():
    results = [
        {"trial": 0, "status": "ok", "val_auc": 0.81, "error": "", "test_auc": 0.99},
        {"trial": 1, "status": "failed", "val_auc": None, "error": "diverged"},
        {"trial": 2, "status": "ok", "val_auc": 0.86, "error": "", "test_auc": 0.50},
        {"trial": 3, "status": "ok", "val_auc": 0.86, "error": ""},
    ]
    assert tuning.select(results)["trial"] == 2  # best val, the lower number on a tie; test never looked at
    with pytest.raises(ConfigError, match="every trial of the search failed.*trial 1: diverged"):
        tuning.select([results[1]])


def test_the_winner_yaml_is_a_training_config_with_the_winners_values():
    config = search()
    winner = {"trial": 4, "val_auc": 0.9, "epochs_run": 3, "overrides": {"model.dropout": 0.33}}
    text = tuning.winner_yaml(config, winner)
    assert text.startswith("# Winner of the search: trial 4")
    again = parse_config(yaml.safe_load(text))
    assert again.model.dropout == 0.33 and again.tuning is None and again.train.epochs == config.train.epochs


def test_the_sagemaker_search_runs_every_trial_on_the_step_operator():
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    from pipelines import launch

    config = load_config(ROOT / "configs" / "tuning_sagemaker.yaml")
    assert config.tuning.trials >= 6 and config.s3.embedded is False
    expanded = launch.with_trial_steps(config.zenml, config.tuning.trials)
    zenml_config = PipelineRunConfiguration.model_validate(expanded)
    on_operator = {name for name, step in zenml_config.steps.items() if step.step_operator == "sagemaker"}
    assert on_operator == {"train_model"} | {f"train_trial_{i}" for i in range(config.tuning.trials)}
    for trial in tuning.sample(config.tuning, config.seed):
        tuning.trial_config(config, trial, trial=True)
    smoke = load_config(ROOT / "configs" / "tuning_smoke.yaml")
    assert smoke.tuning.trials == 3 and smoke.tuning.epochs == 1
