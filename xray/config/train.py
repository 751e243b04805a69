"""``train:``, how the network is fitted: epochs, batches, learning rates and their schedule, augmentation
(``train.augmentation``), precision and distribution."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from xray.config.base import Section


class Augmentation(Section):
    horizontal_flip: bool = True
    zoom: float = Field(0.1, ge=0, lt=1)
    rotation: float = Field(0.0, ge=0, le=0.5, description="Fraction of a full turn, as keras.layers.RandomRotation.")
    contrast: float = Field(0.0, ge=0, lt=1)
    brightness: float = Field(0.0, ge=0, lt=1)
    translation: float = Field(0.0, ge=0, lt=0.5, description="Random shift, as a fraction of the image side.")
    stretch: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Random aspect-ratio change: width scaled by 1 + s and height by 1 - s, "
        "s uniform in +/- stretch. Archives resized to a square squash each radiograph by its original aspect ratio.",
    )
    mixup: float = Field(
        0.0,
        ge=0,
        le=1,
        description="> 0: mix each training image and its label with another of the batch, weight "
        "lambda ~ Beta(mixup, mixup); class weights are mixed the same way. Softens what noisy train labels teach.",
    )
    interpolation: Literal["bilinear", "nearest"] = Field(
        "bilinear", description="Resampling for flip/zoom/rotation; nearest is about twice as fast on CPU."
    )

    @property
    def enabled(self) -> bool:
        return self.horizontal_flip or any(
            (self.zoom, self.rotation, self.contrast, self.brightness, self.translation, self.stretch)
        )


class TrainConfig(Section):
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="cosine: linear warm-up, then cosine decay to 1% of learning_rate by the last epoch of each phase.",
    )
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up from 10% of learning_rate (cosine schedule only).")
    weight_decay: float = Field(
        0.0, ge=0, lt=1, description="> 0: AdamW with this decoupled weight decay instead of Adam."
    )
    frozen_epochs: int = Field(2, ge=0, description="With pretrained weights: epochs with the backbone frozen.")
    fine_tune_layers: int = Field(
        30, ge=0, description="With pretrained weights: top backbone layers unfrozen after the frozen phase."
    )
    fine_tune_learning_rate: float = Field(1e-5, gt=0)
    early_stopping_patience: int = Field(3, ge=1)
    class_weighting: bool = True
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    augmentation: Augmentation = Augmentation()
    mixed_precision: Literal["auto", "on", "off"] = Field("auto", description="auto: on when a GPU is present.")
    jit_compile: Literal["auto", "on", "off"] = Field("auto", description="XLA. auto: on when a GPU is present.")
    run_eagerly: bool = Field(
        False,
        description="Keras runs each step eagerly, no graph traced: for runs of a few batches (the smoke configs), "
        "where tracing ResNet50V2 costs more than the steps; slower per step on real runs. Turns XLA off.",
    )
    # auto: mirrored with several GPUs. batch_size is per replica; learning rates scale with replicas (USER_GUIDE).
    distribution: Literal["auto", "none", "mirrored"] = Field("auto", description="TensorFlow distribution strategy.")
    backup_dir: str | None = Field(None, description="BackupAndRestore root; a run of the same config resumes from it.")
