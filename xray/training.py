"""The fit loop: phases, callbacks, progress output and resumable checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

from xray.config import ModelConfig, TrainConfig
from xray.data import DatasetSpec, fit_class_weight
from xray.model import build_model, compile_model, device_policy, distribution_strategy, resolve_weights, set_backbone_trainable

MONITOR = "val_auc"


def progress_callback(images_per_batch: int, every: float = 0.1):
    """Prints a line about every 10% of an epoch with the measured images/s.

    One line at a time survives log capture (ZenML step logs, SageMaker
    CloudWatch), where Keras' carriage-return progress bar does not.
    """
    import keras

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.start, self.next_report = epoch, time.perf_counter(), every

        def on_train_batch_end(self, batch, logs=None):
            steps = self.params.get("steps") or 0
            done = (batch + 1) / steps if steps else 0
            if steps and done + 1e-9 >= self.next_report:
                rate = (batch + 1) * images_per_batch / (time.perf_counter() - self.start)
                print(f"  epoch {self.epoch + 1} batch {batch + 1}/{steps} loss={logs.get('loss', float('nan')):.4f} {rate:.1f} img/s", flush=True)
                self.next_report += every

    return Progress()


def learning_rate_schedule(config: TrainConfig, peak: float, total_steps: int, steps_per_epoch: float):
    """A float for 'constant'; for 'cosine', warm-up then decay to 1% of peak over the phase's steps.

    The schedule is a function of the optimizer's step counter, which
    BackupAndRestore restores, so a resumed run continues on the same curve.
    """
    if config.lr_schedule == "constant":
        return peak
    import keras

    warmup = min(int(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak * 0.1 if warmup else peak, decay_steps=max(total_steps - warmup, 1), alpha=0.01,
        warmup_target=peak if warmup else None, warmup_steps=warmup)


def without_optimizer(model):
    """An uncompiled copy with the trained weights: the optimizer's slots would triple every saved model."""
    import keras

    clean = keras.models.clone_model(model)
    clean.set_weights(model.get_weights())
    return clean


def checkpoint_key(model_config: ModelConfig, train_config: TrainConfig, spec: DatasetSpec, data_hash: str) -> str:
    """Different configs or data never share a BackupAndRestore directory."""
    payload = json.dumps(
        [model_config.model_dump(mode="json"), train_config.model_dump(mode="json", exclude={"backup_dir"}),
         spec.model_dump(mode="json"), data_hash],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def fit(
    model_config: ModelConfig,
    train_config: TrainConfig,
    spec: DatasetSpec,
    train_ds,
    val_ds,
    extra_callbacks: list | None = None,
    checkpoint_dir: Path | None = None,
    log: Callable[[str], None] = print,
):
    """Train and return (model, history dict of per-epoch lists, throughput info)."""
    import keras

    policy = device_policy(train_config)
    log(f"training on {policy.describe()}")
    weights = resolve_weights(model_config.weights)
    pretrained = weights is not None
    with distribution_strategy(policy).scope():
        model, backbone = build_model(model_config, weights, policy.mixed_precision)
    phases = []
    if pretrained and train_config.frozen_epochs:
        phases.append(("frozen", 0, min(train_config.frozen_epochs, train_config.epochs), train_config.learning_rate))
        phases.append(("fine_tune", train_config.fine_tune_layers, train_config.epochs, train_config.fine_tune_learning_rate))
    else:
        phases.append(("full", None, train_config.epochs, train_config.learning_rate))

    history: dict[str, list[float]] = {}
    start_epoch, started, images = 0, time.perf_counter(), 0
    train_images = sum(spec.counts["train"].values())
    for name, trainable_top, until, learning_rate in phases:
        if until <= start_epoch:
            continue
        set_backbone_trainable(backbone, trainable_top)
        steps = math.ceil(train_images / spec.batch_size) * (until - start_epoch)
        compile_model(model, learning_rate_schedule(train_config, learning_rate, steps, train_images / spec.batch_size),
                      train_config.label_smoothing, policy.jit_compile, train_config.weight_decay)
        early_stopping = keras.callbacks.EarlyStopping(
            monitor=MONITOR, mode="max", patience=train_config.early_stopping_patience, restore_best_weights=True, verbose=1)
        callbacks = [
            early_stopping,
            progress_callback(spec.batch_size),
            *(extra_callbacks or []),
        ]
        if checkpoint_dir is not None:
            callbacks.insert(0, keras.callbacks.BackupAndRestore(str(checkpoint_dir / name), delete_checkpoint=True))
        log(f"phase {name}: epochs {start_epoch + 1}-{until}, learning_rate={learning_rate:g}, "
            f"trainable backbone layers={'all' if trainable_top is None else trainable_top}")
        result = model.fit(
            train_ds, validation_data=val_ds, epochs=until, initial_epoch=start_epoch,
            class_weight=fit_class_weight(spec), callbacks=callbacks, verbose=2,
        )
        for key, values in result.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        images += len(result.history.get("loss", [])) * train_images
        start_epoch = until
        if early_stopping.stopped_epoch:
            break
    seconds = time.perf_counter() - started
    model = without_optimizer(model)
    throughput = {"train_seconds": seconds, "epochs_run": len(history.get("loss", [])),
                  "images_per_second": images / seconds if seconds else 0.0}
    return model, history, throughput

