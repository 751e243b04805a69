"""The fit loop: phases, callbacks, progress output and resumable checkpoints."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from xray import CLASS_NAMES
from xray.config.model import ModelConfig
from xray.config.train import TrainConfig
from xray.data.inputs import DatasetSpec, fit_class_weight
from xray.model.network import (
    build_model,
    compile_model,
    device_policy,
    distribution_strategy,
    resolved_weights,
    set_backbone_trainable,
)

logger = logging.getLogger(__name__)

MONITOR = "val_auc"


def progress_callback(images_per_batch: int, every: float = 0.1):
    """Prints a line about every 10% of an epoch with the measured images/s.

    One line at a time survives log capture (ZenML step logs, SageMaker
    CloudWatch), where Keras' carriage-return progress bar does not.
    """
    import keras  # lazy: Keras imports TensorFlow, seconds

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.start, self.next_report = epoch, time.perf_counter(), every

        def on_train_batch_end(self, batch, logs=None):
            steps = self.params.get("steps") or 0
            done = (batch + 1) / steps if steps else 0
            if steps and done + 1e-9 >= self.next_report:
                rate = (batch + 1) * images_per_batch / (time.perf_counter() - self.start)
                logger.info(
                    "  epoch %d batch %d/%d loss=%.4f %.1f img/s",
                    self.epoch + 1,
                    batch + 1,
                    steps,
                    logs.get("loss", float("nan")),
                    rate,
                )
                self.next_report += every

        def on_epoch_end(self, epoch, logs=None):
            # The epoch's one summary line (Keras' own is off: fit(verbose=0)).
            shown = ("loss", "auc", "val_loss", "val_auc", "val_accuracy")
            metrics = " ".join(f"{k}={logs[k]:.4f}" for k in shown if k in (logs or {}))
            logger.info(
                "epoch %d/%d: %s (%.0f s)",
                epoch + 1,
                self.params.get("epochs") or 0,
                metrics,
                time.perf_counter() - self.start,
            )

    return Progress()


def learning_rate_schedule(config: TrainConfig, peak: float, total_steps: int, steps_per_epoch: float):
    """A float for 'constant'; for 'cosine', warm-up then decay to 1% of peak over the phase's steps.

    The schedule is a function of the optimizer's step counter, which
    BackupAndRestore restores, so a resumed run continues on the same curve.
    """
    if config.lr_schedule == "constant":
        return peak
    import keras  # lazy: Keras imports TensorFlow, seconds

    warmup = min(int(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak * 0.1 if warmup else peak,
        decay_steps=max(total_steps - warmup, 1),
        alpha=0.01,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


class RunState:
    """What a training run keeps across its phases and across a kill: the phases it completed and the weights of its
    best val-AUC epoch so far (in memory, and under ``directory`` when the run is resumable).

    EarlyStopping's own ``restore_best_weights`` keeps the best epoch of one ``fit`` call only: a frozen phase's best
    epoch would be lost at the phase change, and every best epoch at a resume.
    """

    STATE, BEST = "state.json", "best.weights.h5"

    def __init__(self, directory: Path | None):
        self.directory = directory
        self.completed: list[str] = []
        self.stopped = False
        self.best_value, self.best_epoch, self.best_weights = -math.inf, None, None
        if directory is not None and (directory / self.STATE).is_file():
            saved = json.loads((directory / self.STATE).read_text())
            self.completed, self.stopped = saved["completed"], saved["stopped"]
            self.best_value = saved["best_value"] if saved["best_value"] is not None else -math.inf
            self.best_epoch = saved["best_epoch"]

    def _save(self) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {
            "completed": self.completed,
            "stopped": self.stopped,
            "best_epoch": self.best_epoch,
            "best_value": None if self.best_value == -math.inf else self.best_value,
        }
        (self.directory / self.STATE).write_text(json.dumps(state))

    def phase_weights(self, phase: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{phase}.end.weights.h5"

    def record(self, model, epoch: int, value: float | None) -> None:
        """After each epoch (1-based, counted over the whole run)."""
        if value is None or not value > self.best_value:
            return
        self.best_value, self.best_epoch, self.best_weights = float(value), epoch, model.get_weights()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            model.save_weights(self.directory / self.BEST)
            self._save()

    def complete(self, model, phase: str, stopped: bool) -> None:
        self.completed.append(phase)
        self.stopped = stopped
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            model.save_weights(self.phase_weights(phase))
            self._save()

    def restore_best(self, model) -> None:
        if self.best_weights is not None:
            model.set_weights(self.best_weights)
        elif self.directory is not None and (self.directory / self.BEST).is_file():
            model.load_weights(self.directory / self.BEST)

    def callback(self):
        import keras  # lazy: Keras imports TensorFlow, seconds

        state = self

        class BestEpoch(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                state.record(self.model, epoch + 1, (logs or {}).get(MONITOR))

        return BestEpoch()

    def clear(self) -> None:
        if self.directory is None:
            return
        for path in [self.directory / self.STATE, self.directory / self.BEST, *self.directory.glob("*.end.weights.h5")]:
            path.unlink(missing_ok=True)


def without_optimizer(model):
    """An uncompiled copy with the trained weights: the optimizer's slots would triple every saved model.

    Rebuilt from the model's config without its compile config, not ``keras.models.clone_model``, which compiles the clone again when the source was
    compiled (and the saved file then carries a fresh optimizer's variables).
    """
    import keras  # lazy: Keras imports TensorFlow, seconds

    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    clean = keras.saving.deserialize_keras_object(config)
    clean.set_weights(model.get_weights())
    return clean


def checkpoint_key(model_config: ModelConfig, train_config: TrainConfig, spec: DatasetSpec, data_hash: str) -> str:
    """Different configs or data never share a BackupAndRestore directory."""
    payload = json.dumps(
        [
            model_config.model_dump(mode="json"),
            train_config.model_dump(mode="json", exclude={"backup_dir"}),
            spec.model_dump(mode="json"),
            data_hash,
        ],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class History:
    """A training run's record (a ZenML artifact): per-epoch metrics by name (``loss``, ``auc``, ``val_auc``...) and
    throughput (``train_seconds``, ``epochs_run``, ``images_per_second``)."""

    epochs: dict[str, list[float]]
    throughput: dict[str, float]
    model: dict[str, Any]
    """What was trained, on what (the model card's): ``backbone``, ``weights`` and :func:`inputs_of` the spec."""


def inputs_of(spec: DatasetSpec) -> dict[str, Any]:
    """What a model was trained on, as its card and registration record it: image size, preprocessing, class weights
    (by class name), images per split and class."""
    weights = {CLASS_NAMES[int(k)]: round(float(w), 4) for k, w in spec.class_weights.items()}
    return {"image_size": spec.image_size, "preprocessing": spec.preprocessing, "class_weights": weights} | {
        "counts": spec.counts
    }


def fit(
    model_config: ModelConfig,
    train_config: TrainConfig,
    spec: DatasetSpec,
    datasets: tuple,
    extra_callbacks: list | None = None,
    checkpoint_dir: Path | None = None,
    log: Callable[[str], None] = logger.info,
    keep_model: bool = True,
):
    """Train on ``datasets`` (train, val) and return (model, history dict of per-epoch lists, throughput info).

    ``keep_model=False`` (a search's trial, scored by its history): the model is returned as trained, without the
    optimizer-free copy that a stored model needs.
    """
    import keras  # lazy: Keras imports TensorFlow, seconds

    train_ds, val_ds = datasets
    policy = device_policy(train_config)
    strategy = distribution_strategy(train_config.distribution)
    replicas = strategy.num_replicas_in_sync
    # batch_size is per replica. The global batch grows with the replicas, and so do the learning rates: the linear
    # scaling rule (Goyal et al. 2017), which the warm-up of the cosine schedule softens.
    batch = spec.batch_size * replicas
    if replicas > 1:
        train_ds, val_ds = train_ds.rebatch(batch), val_ds.rebatch(batch)
    log(
        f"training on {policy.describe()}, {replicas} replica(s) ({type(strategy).__name__}), global batch {batch}"
        + (", steps run eagerly (train.run_eagerly)" if train_config.run_eagerly else "")
    )
    # The run's seed for every random draw Keras makes (the head's initial weights, dropout, the backbone's when it
    # is not pretrained): without it two runs of one config started from different weights.
    keras.utils.set_random_seed(spec.seed)
    with resolved_weights(model_config.weights) as weights, strategy.scope():
        model, backbone = build_model(model_config, weights, policy.mixed_precision)
    pretrained = weights is not None
    phases = []
    if pretrained and train_config.frozen_epochs:
        phases.append(("frozen", 0, min(train_config.frozen_epochs, train_config.epochs), train_config.learning_rate))
        phases.append(
            ("fine_tune", train_config.fine_tune_layers, train_config.epochs, train_config.fine_tune_learning_rate)
        )
    else:
        phases.append(("full", None, train_config.epochs, train_config.learning_rate))

    history: dict[str, list[float]] = {}
    start_epoch, started, images = 0, time.perf_counter(), 0
    train_images = sum(spec.counts["train"].values())
    state = RunState(checkpoint_dir)
    for name, trainable_top, until, learning_rate in phases:
        if state.stopped:
            break
        if name in state.completed:
            # Killed after this phase ended: start from its final weights, do not train it again.
            model.load_weights(state.phase_weights(name))
            log(
                f"phase {name}: completed before the restart (best val AUC so far {state.best_value:.4f} at epoch "
                f"{state.best_epoch}); not trained again"
            )
            start_epoch = until
            continue
        if until <= start_epoch:
            continue
        set_backbone_trainable(backbone, trainable_top)
        steps = math.ceil(train_images / batch) * (until - start_epoch)
        with strategy.scope():
            compile_model(
                model,
                learning_rate_schedule(train_config, learning_rate * replicas, steps, train_images / batch),
                train_config.label_smoothing,
                policy.jit_compile,
                train_config.weight_decay,
                eager=train_config.run_eagerly,
            )
        # Stopping only: the best epoch's weights are kept by RunState across phases and restarts.
        early_stopping = keras.callbacks.EarlyStopping(
            monitor=MONITOR,
            mode="max",
            patience=train_config.early_stopping_patience,
            restore_best_weights=False,
            verbose=0,
        )
        callbacks = [
            early_stopping,
            *(extra_callbacks or []),
            state.callback(),
            progress_callback(batch),  # last: its "epoch N/M:" line means every callback saw epoch N end
        ]
        if checkpoint_dir is not None:
            callbacks.insert(0, keras.callbacks.BackupAndRestore(str(checkpoint_dir / name), delete_checkpoint=True))
        log(
            f"phase {name}: epochs {start_epoch + 1}-{until}, learning_rate={learning_rate * replicas:g}, "
            f"trainable backbone layers={'all' if trainable_top is None else trainable_top}"
        )
        # BackupAndRestore tells fit where to resume through the model's `_initial_epoch`, and nothing resets it:
        # without this, a phase after a resumed one would start at the resumed phase's epoch and repeat epochs.
        model._initial_epoch = None
        result = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=until,
            initial_epoch=start_epoch,
            class_weight=fit_class_weight(spec),
            callbacks=callbacks,
            verbose=0,
            shuffle=False,  # tf.data shuffles; Keras would only warn that its own shuffle is ignored
        )
        for key, values in result.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        images += len(result.history.get("loss", [])) * train_images
        start_epoch = until
        state.restore_best(model)  # the next phase starts from the best epoch so far, not the phase's last
        state.complete(model, name, stopped=bool(early_stopping.stopped_epoch))
        if early_stopping.stopped_epoch:
            log(
                f"phase {name}: early stopping after epoch {early_stopping.stopped_epoch + 1} ({MONITOR} did not "
                f"improve for {train_config.early_stopping_patience} epochs)"
            )
            break
    state.restore_best(model)
    if state.best_epoch is not None:
        log(f"kept the weights of epoch {state.best_epoch}, the best val AUC of the run ({state.best_value:.4f})")
    state.clear()
    seconds = time.perf_counter() - started
    if keep_model:
        model = without_optimizer(model)
    throughput = {
        "train_seconds": seconds,
        "epochs_run": len(history.get("loss", [])),
        "images_per_second": images / seconds if seconds else 0.0,
    }
    return model, history, throughput
