"""train.distribution on CPU: two logical CPU devices stand in for two GPUs.

A MirroredStrategy run (8 images per replica, 2 replicas: a global batch of 16, the learning rate doubled by the
linear scaling rule) is killed after its first epoch and resumed from its checkpoint. Its first step must see what a
one-replica run with batch 16 sees: the same initial weights, the same 16 images, the replicas' losses combined into
the global batch's mean, so the first batch's loss matches within FIRST_LOSS_TOLERANCE (BatchNorm's statistics,
computed per replica over 8 images, are the one difference). Only the first step is compared: after it, training
32 random images is chaotic (Adam's first steps are about the gradient's sign; with ResNet50V2 the two runs' epoch-2
losses were 0.38 and 0.55 on one machine, 0.38 and 0.56 on another).

The model is a small one with a BatchNormalization layer in the place of build_model's (what is under test is the
strategy, the global batch, the learning rate's scaling and the checkpoints, which do not depend on the backbone):
16 s for the three runs against 157 s with ResNet50V2, whose production path tests/xray/model/test_training_phases.py
trains.
"""

import math
import signal
import subprocess
import sys
import textwrap

import pytest

from support import ROOT

pytestmark = pytest.mark.slow
FIRST_LOSS_TOLERANCE = 0.01  # absolute, on a binary cross-entropy near 0.66 (measured: 0.661437 vs 0.661439)

SCRIPT = textwrap.dedent("""
    import logging, sys, time
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from pathlib import Path
    from xray.config.model import ModelConfig
    from xray.config.train import Augmentation, TrainConfig
    from xray.data.inputs import DatasetSpec
    from xray.model import training

    def small_model(config, weights, mixed_precision=False):  # what build_model returns, with one BatchNormalization
        inputs = keras.Input((config.image_size, config.image_size, 3))
        features = keras.layers.Conv2D(8, 3, strides=2)(keras.layers.Rescaling(1 / 127.5, -1)(inputs))
        backbone = keras.Model(inputs, keras.layers.ReLU()(keras.layers.BatchNormalization()(features)))
        pooled = keras.layers.GlobalAveragePooling2D(name="pool")(backbone.output)
        dense = keras.layers.Dense(config.dense_units, activation="relu")(pooled)
        return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(dense)), backbone

    training.build_model = small_model  # the strategy, the batch and the checkpoints are under test, not the backbone
    folder, distribution, batch, rate = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    keras.utils.set_random_seed(0)

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            print(f"LOSS epoch={epoch + 1} {logs['loss']:.6f}", flush=True)

        def on_train_batch_end(self, batch, logs=None):
            if not hasattr(self, "first"):
                self.first = logs["loss"]
                print(f"FIRST {logs['loss']:.6f}", flush=True)  # the first batch's loss, before any update
            time.sleep(0.2)  # a kill lands after the epoch line, before the next one

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 32, 3)).astype("float32")
    y = np.array([0, 1, 1, 1] * 8, dtype="float32")
    spec = DatasetSpec(image_size=32, batch_size=batch, augmentation=Augmentation(), class_weights={0: 1.0, 1: 1.0},
                       max_train_per_class=None, max_eval_per_class=None, seed=0,
                       counts={"train": {"NORMAL": 8, "PNEUMONIA": 24}})
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    model_config = ModelConfig(image_size=32, dense_units=8, dropout=0.0)
    train_config = TrainConfig(epochs=2, batch_size=batch, learning_rate=rate, early_stopping_patience=10,
                               mixed_precision="off", jit_compile="off", distribution=distribution)
    checkpoints = folder / "backup" / training.checkpoint_key(model_config, train_config, spec, "data")
    model, history, _ = training.fit(model_config, train_config, spec, (ds, ds), extra_callbacks=[Report()],
                                     checkpoint_dir=checkpoints)
    print(f"FINAL {history['loss'][-1]:.6f}", flush=True)
""")


def _start(folder, *args):
    return subprocess.Popen(
        [sys.executable, "-u", "-c", SCRIPT, str(folder), *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _epochs(output: str) -> list[str]:
    return [line.split()[1].rstrip(":") for line in output.splitlines() if line.startswith("epoch ")]


def test_two_replicas_checkpoint_resume_and_match_one_replica_with_the_global_batch(tmp_path):
    mirrored = tmp_path / "mirrored"
    first = _start(mirrored, "mirrored", 8, 1e-3)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if line.startswith("epoch 1/2:"):
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=120)
    text = "".join(lines)
    assert first.returncode == -signal.SIGKILL, text[-3000:]
    assert "2 replica(s) (MirroredStrategy), global batch 16" in text and "learning_rate=0.002" in text, text[-3000:]
    resumed = _start(mirrored, "mirrored", 8, 1e-3)
    second, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and _epochs(second) == ["2/2"], second[-3000:]  # resumed after epoch 1
    single = _start(tmp_path / "single", "none", 16, 2e-3)
    one, _ = single.communicate(timeout=600)
    assert single.returncode == 0 and "1 replica(s)" in one and "global batch 16" in one, one[-3000:]
    first_loss = {name: _value(out, "FIRST") for name, out in (("mirrored", text), ("one", one))}
    assert abs(first_loss["mirrored"] - first_loss["one"]) <= FIRST_LOSS_TOLERANCE, first_loss
    final = {name: _value(out, "FINAL") for name, out in (("mirrored", second), ("one", one))}
    assert all(math.isfinite(value) for value in final.values()), final


def _value(output: str, key: str) -> float:
    return float(next(line.split()[1] for line in output.splitlines() if line.startswith(f"{key} ")))
