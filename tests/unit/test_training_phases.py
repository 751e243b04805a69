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

from conftest import ROOT

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=__import__("sys").stdout)
    import hashlib, sys, time
    import numpy as np, tensorflow as tf, keras
    from pathlib import Path
    from xray.config import Augmentation, ModelConfig, TrainConfig
    from xray.data import DatasetSpec
    from xray import training

    folder = Path(sys.argv[1])
    weights_file = folder / "backbone.weights.h5"
    if not weights_file.exists():  # a local "pretrained" backbone file, as a site without internet would have
        from xray.model import build_model
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
    y = np.array([0, 1] * 8, dtype="float32")
    spec = DatasetSpec(image_size=32, batch_size=8, augmentation=Augmentation(), class_weights={0: 1.0, 1: 1.0},
                       max_train_per_class=None, max_eval_per_class=None, seed=0,
                       counts={"train": {"NORMAL": 8, "PNEUMONIA": 8}})
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model_config = ModelConfig(image_size=32, dense_units=4, weights=str(weights_file))
    train_config = TrainConfig(epochs=4, frozen_epochs=2, fine_tune_layers=6, early_stopping_patience=10,
                               mixed_precision="on", jit_compile="off")
    checkpoints = folder / "backup" / training.checkpoint_key(model_config, train_config, spec, "data")
    model, history, _ = training.fit(model_config, train_config, spec, ds, ds, extra_callbacks=[Script()],
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
    first = _start(folder)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if line.startswith(epoch_line):
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=120)
    assert first.returncode == -signal.SIGKILL, "".join(lines[-30:])
    return "".join(lines)


def _finish(folder) -> str:
    second = _start(folder)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-4000:]
    return output


def test_uninterrupted_run_keeps_the_frozen_phases_best_epoch(tmp_path):
    output = _finish(tmp_path)
    weights, trainable = _values(output, "WEIGHTS"), _values(output, "TRAINABLE")
    assert sorted(weights) == [1, 2, 3, 4]
    assert "phase frozen" in output and "phase fine_tune" in output
    assert int(trainable[2]) < int(trainable[3]), "fine-tuning unfreezes backbone layers"
    assert "DTYPE bfloat16" in output, "mixed precision on CPU computes in bfloat16"
    assert len({weights[e] for e in weights}) == 4, "every epoch changes the weights"
    assert output.splitlines()[-1] == f"FINAL {weights[2]}"
    assert not [p for p in (tmp_path / "backup").rglob("*") if p.is_file()], "nothing is left to resume from"


def test_killed_in_the_frozen_phase_resumes_there(tmp_path):
    first = _run_killed_at(tmp_path, "epoch 1/2:")  # epoch 1 done and backed up
    second = _finish(tmp_path)
    epochs = [line.split()[1].rstrip(":") for line in second.splitlines() if line.startswith("epoch ")]
    # Each epoch once: Keras' BackupAndRestore must not leak the resumed epoch into the fine-tune phase's fit.
    assert epochs == ["2/2", "3/4", "4/4"], second[-3000:]
    weights = _values(first, "WEIGHTS") | _values(second, "WEIGHTS")
    assert second.splitlines()[-1] == f"FINAL {weights[2]}"


def test_killed_while_fine_tuning_resumes_without_retraining_the_frozen_phase(tmp_path):
    first = _run_killed_at(tmp_path, "epoch 3/4:")  # epochs 1-2 (frozen) and 3 (fine-tune) done
    assert "phase fine_tune" in first
    second = _finish(tmp_path)
    assert "phase frozen: completed before the restart" in second
    epochs = [line.split()[1].rstrip(":") for line in second.splitlines() if line.startswith("epoch ")]
    assert epochs == ["4/4"], second[-3000:]
    # The best epoch (2) ran in the first process: its weights come back from disk.
    assert second.splitlines()[-1] == f"FINAL {_values(first, 'WEIGHTS')[2]}"
