"""A training killed mid-run resumes from its last completed epoch (BackupAndRestore)."""

import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=__import__("sys").stdout)
    import sys, time
    import numpy as np, tensorflow as tf
    from pathlib import Path
    from xray.config import Augmentation, ModelConfig, TrainConfig
    from xray.data import DatasetSpec
    from xray import training
    import keras

    class SlowDown(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.5)  # a kill must land mid-epoch, not after the run

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32, 3)).astype("float32")
    y = np.array([0, 1] * 8, dtype="float32")
    spec = DatasetSpec(image_size=32, batch_size=8, augmentation=Augmentation(), class_weights={0: 1.0, 1: 1.0},
                       max_train_per_class=None, max_eval_per_class=None, seed=0,
                       counts={"train": {"NORMAL": 8, "PNEUMONIA": 8}})
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model_config = ModelConfig(image_size=32, dense_units=4)
    train_config = TrainConfig(epochs=3, early_stopping_patience=10)
    checkpoints = Path(sys.argv[1]) / training.checkpoint_key(model_config, train_config, spec, "data")
    _, history, _ = training.fit(model_config, train_config, spec, ds, ds, extra_callbacks=[SlowDown()],
                                 checkpoint_dir=checkpoints)
    print("EPOCHS_RUN", len(history["loss"]), flush=True)
""")


def _start(backup):
    return subprocess.Popen(
        [sys.executable, "-u", "-c", SCRIPT, str(backup)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_killed_training_continues_from_last_completed_epoch(tmp_path):
    first = _start(tmp_path)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if line.startswith("epoch 1/3:"):  # epoch 1 finished and was backed up
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "".join(lines[-20:])
    assert any(tmp_path.rglob("*")), "no checkpoint was written"

    second = _start(tmp_path)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output[-3000:]
    epochs = [line.split()[1].rstrip(":") for line in output.splitlines() if line.startswith("epoch ")]
    assert epochs == ["2/3", "3/3"], output[-3000:]
    assert "EPOCHS_RUN 2" in output  # epochs 2 and 3 only
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "the backup is deleted after a completed run"
