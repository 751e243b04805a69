"""The inference runtime (xray.serving.predictor.choose_runtime, ChestXrayPredictor.use_runtime): which one runs where,
and OpenVINO scoring like Keras on a small model, pixels and encoded images alike. Its speed and its accuracy on the
624 test images with a registered version: benchmarks/cpu_runtimes.py (docs/BENCHMARKS.md "CPU runtimes")."""

import io

import numpy as np
import pytest
from PIL import Image

from xray.errors import ConfigError
from xray.serving import predictor as predictor_module
from xray.serving.predictor import ChestXrayPredictor, choose_runtime, openvino_forwards, runtime_candidates

SIZE = 32


class FakeCore:
    capabilities: list[str] = []

    def get_property(self, device, name):
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.capabilities


@pytest.mark.parametrize(
    "setting, capabilities, gpus, chosen",
    [
        ("keras", ["BF16"], [], ("keras", "f32")),
        ("openvino", ["FP32", "BF16"], [], ("openvino", "bf16")),
        ("openvino", ["FP32"], [], ("openvino", "f32")),  # asked for: fp32 where the CPU has no BF16
        ("auto", ["FP32", "BF16"], [], ("openvino", "bf16")),
        ("auto", ["FP32"], [], ("keras", "f32")),  # OpenVINO fp32 measured under 1.3x: not chosen by itself
        ("auto", ["FP32", "BF16"], ["GPU:0"], ("keras", "f32")),  # a GPU runs Keras
    ],
)
def test_the_runtime_follows_the_setting_and_the_cpu(monkeypatch, setting, capabilities, gpus, chosen):
    import openvino
    import tensorflow as tf

    monkeypatch.delenv("XRAY_INFERENCE_RUNTIME", raising=False)
    monkeypatch.setattr(FakeCore, "capabilities", capabilities)
    monkeypatch.setattr(openvino, "Core", FakeCore)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: gpus if kind == "GPU" else [])
    assert choose_runtime(setting) == chosen


@pytest.mark.parametrize(
    "setting, capabilities, gpus, chosen",
    [
        ("auto", ["FP32", "INT8"], [], [("openvino", "int8")]),  # an AVX2 or AVX-512 CPU: the version's int8
        # BF16 kernels too (AMX, AVX-512 BF16): both, and the predictor's warm-up measures which is faster here
        ("auto", ["FP32", "BF16", "INT8"], [], [("openvino", "int8"), ("openvino", "bf16")]),
        ("auto", ["FP32", "INT8"], ["GPU:0"], [("keras", "f32")]),  # a GPU runs Keras
        ("openvino", ["FP32", "INT8"], [], [("openvino", "f32")]),  # asked for OpenVINO: as before
        ("keras", ["FP32", "INT8"], [], [("keras", "f32")]),
    ],
)
def test_auto_offers_the_versions_int8_where_it_carries_one_and_bf16_where_the_cpu_has_it(
    monkeypatch, setting, capabilities, gpus, chosen
):
    import openvino
    import tensorflow as tf

    monkeypatch.delenv("XRAY_INFERENCE_RUNTIME", raising=False)
    monkeypatch.setattr(FakeCore, "capabilities", capabilities)
    monkeypatch.setattr(openvino, "Core", FakeCore)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: gpus if kind == "GPU" else [])
    assert runtime_candidates(setting, has_int8=True) == chosen


def test_the_int8_runtime_without_an_int8_model_is_an_error(small_model):
    with pytest.raises(ConfigError, match="this version has none"):
        openvino_forwards(small_model, SIZE, "int8")


def test_the_environment_overrides_the_setting_and_a_wrong_name_is_one_error(monkeypatch):
    monkeypatch.setenv("XRAY_INFERENCE_RUNTIME", "keras")
    assert choose_runtime("openvino") == ("keras", "f32")
    monkeypatch.setenv("XRAY_INFERENCE_RUNTIME", "onnx")
    with pytest.raises(ConfigError, match="inference runtime 'onnx' is not one of auto, keras, openvino"):
        choose_runtime("auto")


@pytest.fixture(scope="module")
def small_model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Rescaling(1 / 127.5, offset=-1),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )


def images(count: int) -> tuple[np.ndarray, list[bytes]]:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (count, SIZE, SIZE, 3)).astype(np.uint8)
    encoded = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return pixels.astype(np.float32), encoded


@pytest.mark.slow
def test_openvino_fp32_scores_like_keras_on_pixels_and_on_encoded_images(small_model):
    import tensorflow as tf

    pixels, encoded = images(20)
    keras_predictor = ChestXrayPredictor(small_model, 0.5, SIZE)
    forward, forward_encoded = openvino_forwards(small_model, SIZE, "f32")
    expected = keras_predictor.probabilities(pixels)
    np.testing.assert_allclose(forward(pixels).ravel(), expected, atol=1e-4)
    np.testing.assert_allclose(
        forward_encoded(tf.constant(encoded)).ravel(), keras_predictor.probabilities_of_encoded(encoded), atol=1e-4
    )
    assert forward(pixels[:1]).shape[0] == 1 and forward(pixels[:7]).shape[0] == 7  # any batch size


@pytest.mark.slow
def test_a_mixed_precision_model_converts_too_and_scores_like_keras():
    """A model trained in mixed precision (a GPU's) goes through a SavedModel export: traced directly, its bfloat16
    casts would reach OpenVINO untyped and the CPU plugin would refuse it. Its float32 head is no exception."""
    import keras
    import openvino

    from xray.serving.predictor import computes_in_float32, openvino_model

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        inputs = keras.Input((SIZE, SIZE, 3))
        backbone = keras.Model(inputs, keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    pooled = keras.layers.GlobalAveragePooling2D()(backbone.output)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled))
    assert model.compute_dtype == "float32" and not computes_in_float32(model)  # the backbone inside is mixed
    pixels, _ = images(8)
    compiled = openvino.Core().compile_model(openvino_model(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(pixels)[0].ravel(), model.predict(pixels, verbose=0).ravel(), atol=0.01)


@pytest.mark.slow
def test_a_predictor_on_openvino_answers_as_on_keras(small_model, monkeypatch):
    """use_runtime swaps only the forward pass: the table's rows, statuses and labels stay those of Keras."""
    monkeypatch.delenv("XRAY_INFERENCE_RUNTIME", raising=False)
    monkeypatch.setattr(predictor_module, "runtime_candidates", lambda setting, has_int8=False: [("openvino", "f32")])
    _, encoded = images(12)
    keras_rows = ChestXrayPredictor(small_model, 0.5, SIZE).predict_bytes(encoded + [b"not an image"])
    predictor = ChestXrayPredictor(small_model, 0.5, SIZE)
    assert predictor.runtime == "keras f32" and predictor.use_runtime("openvino") == "openvino f32"
    rows = predictor.predict_bytes(encoded + [b"not an image"])
    np.testing.assert_allclose(
        rows["probability"][:12].astype(float), keras_rows["probability"][:12].astype(float), atol=1e-4
    )
    assert list(rows["status"]) == list(keras_rows["status"]) and rows["status"].iloc[-1] == "unreadable"


@pytest.mark.slow
def test_openvino_bf16_stays_close_where_the_cpu_has_it(small_model):
    import openvino

    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no BF16 (AMX or AVX-512 BF16): OpenVINO would not run bf16 here")
    pixels, _ = images(20)
    forward, _ = openvino_forwards(small_model, SIZE, "bf16")
    expected = ChestXrayPredictor(small_model, 0.5, SIZE).probabilities(pixels)
    np.testing.assert_allclose(forward(pixels).ravel(), expected, atol=0.02)


@pytest.mark.slow
def test_serving_runs_on_the_runtime_its_environment_names(small_model, monkeypatch):
    """The pyfunc loader (what `mlflow models serve` calls) applies XRAY_INFERENCE_RUNTIME, else auto."""
    from xray.serving import bundle, pyfunc

    monkeypatch.setattr(bundle, "read", lambda path: ChestXrayPredictor(small_model, 0.5, SIZE))
    monkeypatch.setattr(pyfunc.prediction_log, "from_environment", lambda: None)
    monkeypatch.setenv("XRAY_INFERENCE_RUNTIME", "openvino")
    assert pyfunc._load_pyfunc("data").predictor.runtime.startswith("openvino ")
    monkeypatch.setenv("XRAY_INFERENCE_RUNTIME", "keras")
    assert pyfunc._load_pyfunc("data").predictor.runtime == "keras f32"
