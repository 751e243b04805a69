"""The classifier: backbone + head, preprocessing inside, and the device policy."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray.config.model import ModelConfig
from xray.config.train import TrainConfig
from xray.data.inputs import make_dataset
from xray.errors import ConfigError
from xray.storage import s3

BACKBONES = {
    # name: (keras.applications constructor, takes include_preprocessing)
    "resnet50v2": ("ResNet50V2", False),
    "efficientnetv2b0": ("EfficientNetV2B0", True),
    "mobilenetv3large": ("MobileNetV3Large", True),
}


@dataclass(frozen=True)
class DevicePolicy:
    gpus: int
    mixed_precision: bool
    jit_compile: bool

    def describe(self) -> str:
        where = f"{self.gpus} GPU(s)" if self.gpus else "CPU"
        return f"{where}, mixed_precision={self.mixed_precision}, jit_compile={self.jit_compile}"


def device_policy(config: TrainConfig) -> DevicePolicy:
    import tensorflow as tf  # lazy: TensorFlow's import takes seconds

    gpus = len(tf.config.list_physical_devices("GPU"))

    def resolve(setting: str) -> bool:
        return setting == "on" or (setting == "auto" and gpus > 0)

    return DevicePolicy(gpus, resolve(config.mixed_precision), resolve(config.jit_compile))


def distribution_strategy(setting: str = "auto"):
    """train.distribution: ``none`` the default strategy; ``mirrored`` a MirroredStrategy over the visible GPUs, or
    over every logical CPU device where there is no GPU (how it is tested here); ``auto`` mirrored when several GPUs
    are visible. Replicas: ``strategy.num_replicas_in_sync``."""
    import tensorflow as tf  # lazy: TensorFlow's import takes seconds

    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if setting == "none" or (setting == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(gpus or [device.name for device in tf.config.list_logical_devices("CPU")])


@contextmanager
def resolved_weights(weights: str) -> Iterator[str | None]:
    """'imagenet' and local paths pass through; s3:// is fetched into a folder removed on exit (the backbone reads
    the file when it is built); 'none' -> None."""
    if weights.lower() == "none":
        yield None
    elif weights.lower() == "imagenet":
        yield "imagenet"
    elif weights.startswith("s3://"):
        location = s3.parse_s3_uri(weights)
        with tempfile.TemporaryDirectory(prefix="xray-weights-") as folder:
            target = Path(folder) / Path(location.key).name
            s3.download(s3.make_client(), location, target)
            yield str(target)
    else:
        path = Path(weights.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.weights: weights file not found: {path}")
        yield str(path)


def build_model(config: ModelConfig, weights: str | None, mixed_precision: bool = False):
    """Raw RGB in [0, 255] -> P(PNEUMONIA).

    The backbone's layers are built on the preprocessed input tensor (not
    nested), so Grad-CAM reaches its last feature map as the input of "pool".
    """
    import keras  # lazy: Keras imports TensorFlow, seconds

    # float16 on a GPU; bfloat16 on a CPU, which has no fast float16 kernels (and the same 8-bit exponent as float32).
    if mixed_precision:
        import tensorflow as tf  # lazy: TensorFlow's import takes seconds

        keras.mixed_precision.set_global_policy(
            "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
        )
    else:
        keras.mixed_precision.set_global_policy("float32")
    size = config.image_size
    inputs = keras.Input((size, size, 3), name="image")
    constructor, has_preprocessing = BACKBONES[config.backbone]
    # With fixed scaling, a backbone that has its own ImageNet preprocessing keeps it (EfficientNetV2's B variants
    # use ImageNet mean and std, not [-1, 1]); per-image standardisation replaces it.
    own_preprocessing = has_preprocessing and config.input_normalization == "fixed"
    options = {"include_preprocessing": own_preprocessing} if has_preprocessing else {}
    # Scaling inside the model keeps serving and training identical.
    if config.input_normalization == "per_image":
        # Mean and variance over all pixels of each image; float32 because the sum of squares overflows float16.
        scaled = keras.layers.LayerNormalization(
            axis=[1, 2, 3], center=False, scale=False, epsilon=1.0, dtype="float32", name="preprocess"
        )(inputs)
    elif own_preprocessing:
        scaled = inputs
    else:
        # The [-1, 1] range ResNet50V2's ImageNet weights were trained on.
        scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(inputs)
    backbone = getattr(keras.applications, constructor)(
        include_top=False, weights=weights, input_tensor=scaled, **options
    )
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone.output)
    x = keras.layers.Dense(config.dense_units, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(config.dropout, name="dropout")(x)
    # float32 output keeps the sigmoid and the loss numerically stable under mixed precision.
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    model = keras.Model(inputs, outputs, name=f"xray_{config.backbone}")
    return model, backbone


def set_backbone_trainable(backbone, trainable_top: int | None) -> None:
    """None: all trainable; 0: frozen; N: only the top N layers, BatchNorm kept frozen."""
    import keras  # lazy: Keras imports TensorFlow, seconds

    layers = backbone.layers
    for index, layer in enumerate(layers):
        if trainable_top is None:
            layer.trainable = True
        else:
            in_top = index >= len(layers) - trainable_top
            layer.trainable = in_top and not isinstance(layer, keras.layers.BatchNormalization)


def compile_model(
    model, learning_rate, label_smoothing: float, jit_compile: bool, weight_decay: float = 0.0, eager: bool = False
) -> None:
    """``learning_rate``: a float or a keras LearningRateSchedule; ``eager``: steps run eagerly (no graph, no XLA)."""
    import keras  # lazy: Keras imports TensorFlow, seconds

    if weight_decay:
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=[
            keras.metrics.AUC(name="auc"),
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
        jit_compile=jit_compile and not eager,
        run_eagerly=eager,
    )


def _head_logit(model):
    """The pre-sigmoid logit tensor of a classifier built by :func:`build_model`, calibrated or not."""
    import keras  # lazy: Keras imports TensorFlow, seconds

    if "logit" in [layer.name for layer in model.layers]:
        return model.get_layer("probability").input  # calibrated: sigmoid(z / temperature + bias)
    head = model.get_layer("probability")
    # The head is Dense(1, sigmoid): the same Dense without its activation, sharing its weights.
    linear = keras.layers.Dense(1, dtype="float32", name="logit")
    logit = linear(head.input)
    linear.set_weights(head.get_weights())
    return logit


def logit_model(model):
    """The classifier up to its pre-sigmoid logit (calibration is fitted on these, at full precision)."""
    import keras  # lazy: Keras imports TensorFlow, seconds

    return keras.Model(model.inputs, _head_logit(model), name=f"{model.name}_logit")


def calibrated_model(model, temperature: float, bias: float):
    """The same classifier whose output is sigmoid(logit / temperature + bias), built from Keras layers only.

    The head becomes ``logit`` (Dense, linear) -> ``calibration`` (Rescaling) -> ``probability`` (sigmoid), so the
    saved model carries its calibration and loads without custom objects wherever the model is loaded.
    """
    import keras  # lazy: Keras imports TensorFlow, seconds

    if "logit" in [layer.name for layer in model.layers]:
        raise ValueError(f"model {model.name} is already calibrated")
    scaled = keras.layers.Rescaling(1.0 / temperature, offset=bias, dtype="float32", name="calibration")(
        _head_logit(model)
    )
    outputs = keras.layers.Activation("sigmoid", dtype="float32", name="probability")(scaled)
    return keras.Model(model.inputs, outputs, name=model.name)


def predict_paths(model, paths: list[str], spec) -> np.ndarray:
    """The model's output for each image file, decoded and batched in parallel by tf.data (evaluation, the gate)."""
    if not paths:
        return np.zeros(0, dtype=np.float32)
    return model.predict(make_dataset(paths, None, spec), verbose=0).reshape(-1)
