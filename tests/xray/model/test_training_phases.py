"""The production training path on CPU: pretrained weights from a file, a frozen then a fine-tuned phase, mixed
precision, and a kill-and-resume in each phase.

The val AUC of each epoch is scripted (a callback rewrites the logged value before the run's best-epoch tracker
reads it), so which epoch is best is known: epoch 2, in the frozen phase. Its weights must be the ones the run
returns, after the phase change and after a restart.
"""

import signal
import subprocess
import sys
import textwrap

import pytest

from support import ROOT

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=__import__("sys").stdout)
    import hashlib, sys, time
    import numpy as np, tensorflow as tf, keras
    from pathlib import Path
    from xray.config.model import ModelConfig
    from xray.config.train import Augmentation, TrainConfig
    from xray.data.inputs import DatasetSpec
    from xray.model import training

    folder = Path(sys.argv[1])
    weights_file = folder / "backbone.weights.h5"
    if not weights_file.exists():  # a local "pretrained" backbone file, as a site without internet would have
        from xray.model.network import build_model
        build_model(ModelConfig(image_size=32, dense_units=4), None)[1].save_weights(weights_file)
    SCRIPTED = {1: 0.60, 2: 0.90, 3: 0.70, 4: 0.80}   # the best epoch is 2, the frozen phase's last

    def digest(weights):
        return hashlib.sha256(b"".join(np.asarray(w, dtype=np.float32).tobytes() for w in weights)).hexdigest()[:16]

    class Script(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_auc"] = SCRIPTED[epoch + 1]
            print(f"WEIGHTS epoch={epoch + 1} {digest(self.model.get_weights())}", flush=True)
            print(f"TRAINABLE epoch={epoch + 1} {len(self.model.trainable_weights)}", flush=True)
            print(f"DTYPE {self.model.get_layer('pool').compute_dtype}", flush=True)

        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.3)  # a kill lands mid-epoch

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32, 3)).astype("float32")
    # Unbalanced on purpose: with balanced labels a head whose ReLU units all start dead (a few percent of random
    # initialisations of a small head) gets exactly zero gradient, and no epoch would change any weight.
    y = np.array([0, 1, 1, 1] * 4, dtype="float32")
    spec = DatasetSpec(image_size=32, batch_size=8, augmentation=Augmentation(), class_weights={0: 1.0, 1: 1.0},
                       max_train_per_class=None, max_eval_per_class=None, seed=0,
                       counts={"train": {"NORMAL": 4, "PNEUMONIA": 12}})
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model_config = ModelConfig(image_size=32, dense_units=4, weights=str(weights_file))
    train_config = TrainConfig(epochs=4, frozen_epochs=2, fine_tune_layers=6, early_stopping_patience=10,
                               mixed_precision="on", jit_compile="off")
    checkpoints = folder / "backup" / training.checkpoint_key(model_config, train_config, spec, "data")
    model, history, _ = training.fit(model_config, train_config, spec, (ds, ds), extra_callbacks=[Script()],
                                     checkpoint_dir=checkpoints)
    print(f"FINAL {digest(model.get_weights())}", flush=True)
""")


def _start(folder):
    return subprocess.Popen(
        [sys.executable, "-u", "-c", SCRIPT, str(folder)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _values(output: str, key: str) -> dict[int, str]:
    return {int(line.split()[1].split("=")[1]): line.split()[2] for line in output.splitlines() if line.startswith(key)}


def _run_killed_at(folder, epoch_line: str) -> str:
    process = _start(folder)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(epoch_line):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, "".join(lines[-30:])
    return "".join(lines)


def _finish(folder) -> str:
    process = _start(folder)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def _epochs(output: str) -> list[str]:
    return [line.split()[1].rstrip(":") for line in output.splitlines() if line.startswith("epoch ")]


def test_killed_in_each_phase_it_resumes_there_and_keeps_the_best_epoch(tmp_path):
    """Three processes: killed after epoch 1 (frozen), resumed and killed after epoch 3 (fine-tuning), resumed to the
    end. The single-phase path (no pretrained weights: one phase "full") is the same loop with one phase."""
    first = _run_killed_at(tmp_path, "epoch 1/2:")  # epoch 1 done and backed up
    assert "phase frozen" in first and _epochs(first) == ["1/2"]
    second = _run_killed_at(tmp_path, "epoch 3/4:")  # epoch 2 (frozen) and 3 (fine-tune) done
    # Each epoch once: Keras' BackupAndRestore must not leak the resumed epoch into the fine-tune phase's fit.
    assert _epochs(second) == ["2/2", "3/4"] and "phase fine_tune" in second, second[-3000:]
    trainable = _values(second, "TRAINABLE")
    assert int(trainable[2]) < int(trainable[3]), "fine-tuning unfreezes backbone layers"
    assert "DTYPE bfloat16" in second, "mixed precision on CPU computes in bfloat16"
    third = _finish(tmp_path)
    # Killed while fine-tuning: the frozen phase is not trained again.
    assert "phase frozen: completed before the restart" in third and _epochs(third) == ["4/4"], third[-3000:]
    weights = _values(first, "WEIGHTS") | _values(second, "WEIGHTS") | _values(third, "WEIGHTS")
    assert sorted(weights) == [1, 2, 3, 4] and len(set(weights.values())) == 4, "every epoch changes the weights"
    # The best epoch (2) ran in the second process, before the phase change: its weights come back from disk.
    assert third.splitlines()[-1] == f"FINAL {weights[2]}"
    assert not [p for p in (tmp_path / "backup").rglob("*") if p.is_file()], "nothing is left to resume from"


def test_the_returned_model_carries_no_optimizer(tmp_path):
    import keras
    import numpy as np

    from xray.model.network import compile_model
    from xray.model.training import without_optimizer

    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(64, 3)(keras.layers.Rescaling(1 / 127.5)(inputs))
    )
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Dense(256)(pooled)))
    compile_model(model, 1e-3, 0.0, False)
    model.fit(np.zeros((2, 32, 32, 3)), np.zeros(2), verbose=0)
    clean = without_optimizer(model)
    assert not clean.compiled
    clean.save(tmp_path / "clean.keras")
    model.save(tmp_path / "trained.keras")
    # The trained model's file also holds Adam's two slots per weight; the clean one only the weights.
    assert (tmp_path / "clean.keras").stat().st_size < 0.5 * (tmp_path / "trained.keras").stat().st_size
    loaded = keras.models.load_model(tmp_path / "clean.keras")
    batch = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(batch, verbose=0), model.predict(batch, verbose=0), atol=1e-6)


def test_one_config_trains_the_same_weights_twice(monkeypatch):
    """The run's seed fixes Keras' draws (the initial weights): two fits of one config and data end equal, and another
    seed starts elsewhere. A one-layer backbone stands in for ResNet50V2 (support.one_layer_model: the draws are the
    same kind)."""
    import numpy as np
    import tensorflow as tf

    from support import one_layer_model
    from xray.config.model import ModelConfig
    from xray.config.train import Augmentation, TrainConfig
    from xray.data.inputs import DatasetSpec
    from xray.model import training

    monkeypatch.setattr(training, "build_model", one_layer_model)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, np.array([0, 1, 1, 1] * 4, dtype="float32"))).batch(8)

    def weights(seed):
        spec = DatasetSpec(
            image_size=32, batch_size=8, augmentation=Augmentation(), class_weights={0: 1.0, 1: 1.0},
            max_train_per_class=None, max_eval_per_class=None, seed=seed, counts={"train": {"NORMAL": 4, "PNEUMONIA": 12}},
        )  # fmt: skip
        config = ModelConfig(image_size=32, dense_units=4, weights="none")
        model, _, _ = training.fit(config, TrainConfig(epochs=2, jit_compile="off"), spec, (data, data))
        return model.get_weights()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
