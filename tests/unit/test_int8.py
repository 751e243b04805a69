"""int8 with accuracy control (xray.serving.runtimes.int8) on a small model: NNCF quantizes it, the val control
passes or says why not, and the recipe is recorded. Its speed and test AUC on a registered version:
benchmarks/cpu_runtimes.py --int8 (docs/BENCHMARKS.md "int8")."""

import numpy as np
import pytest

from xray.serving.predictor import ChestXrayPredictor, openvino_model
from xray.serving.runtimes import int8

SIZE = 32


@pytest.fixture(scope="module")
def small_model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Rescaling(1 / 127.5, offset=-1),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )


@pytest.fixture(scope="module")
def data(small_model):
    """Calibration pixels, and val pixels labelled by the fp32 model itself at its median: fp32's val AUC is 1, so
    what int8 loses is what quantization costs. The threshold is that median."""
    rng = np.random.default_rng(2)

    def images(count):  # of varied brightness, so that the model's scores spread
        return (rng.uniform(0, 1, (count, SIZE, SIZE, 3)) * rng.uniform(40, 255, (count, 1, 1, 1))).astype(np.float32)

    calibration, val = images(40), images(120)
    scores = ChestXrayPredictor(small_model, 0.5, SIZE).probabilities(val)
    threshold = float(np.median(scores))
    # Only images clear of the threshold: a label flipped by int8 is then a real fault, not rounding at the edge.
    low, high = np.quantile(scores, [0.3, 0.7])
    clear = (scores <= low) | (scores >= high)
    return calibration, (val[clear], (scores[clear] >= threshold).astype(int)), threshold


def test_int8_passes_its_val_control_and_carries_the_figures_it_passed(small_model, data):
    import openvino as ov

    calibration, val, threshold = data
    outcome = int8.quantize(openvino_model(small_model), calibration, val, threshold, int8.Recipe(subset_size=40))
    assert outcome.passed and outcome.reason == ""
    assert outcome.val_auc_fp32 == pytest.approx(1.0, abs=1e-6)
    assert outcome.val_auc_fp32 - outcome.val_auc_int8 <= int8.MAX_DROP
    assert outcome.val_labels_unchanged >= int8.MIN_LABELS_UNCHANGED
    assert outcome.images == {"calibration": 40, "val": len(val[0])}
    # Really quantized: NNCF's FakeQuantize operations sit in the model it returns.
    assert any(op.get_type_name() == "FakeQuantize" for op in outcome.model.get_ops())
    compiled = ov.Core().compile_model(outcome.model, "CPU")
    assert int8.probabilities(compiled, val[0][:7]).shape == (7,)  # any batch size
    figures = outcome.figures()
    assert figures["passed"] and figures["recipe"]["preset"] == "performance" and "model" not in figures


def test_a_control_int8_cannot_meet_leaves_no_model_and_says_why(small_model, data):
    calibration, val, threshold = data
    recipe = int8.Recipe(subset_size=40, min_labels_unchanged=1.01)  # no model keeps more than all its labels
    outcome = int8.quantize(openvino_model(small_model), calibration, val, threshold, recipe)
    assert outcome.model is None and not outcome.passed
    assert "of val labels unchanged at threshold" in outcome.reason and "101.0% needed" in outcome.reason
    assert outcome.val_labels_unchanged is not None and outcome.figures()["passed"] is False


def test_the_ignored_scope_is_applied_and_recorded(small_model, data):
    calibration, val, threshold = data
    recipe = int8.Recipe(subset_size=40, ignored_types=("Convolution",))
    outcome = int8.quantize(openvino_model(small_model), calibration, val, threshold, recipe)
    assert outcome.figures()["recipe"]["ignored_types"] == ("Convolution",)
    if outcome.passed:  # nothing left to quantize but the dense head: no FakeQuantize feeds a convolution
        for op in outcome.model.get_ops():
            if op.get_type_name() == "Convolution":
                assert all(
                    value.get_node().get_type_name() != "FakeQuantize" for value in op.input_values()
                ), op.get_friendly_name()


def test_val_images_of_one_class_are_refused(small_model, data):
    calibration, (pixels, _), threshold = data
    with pytest.raises(ValueError, match="both classes"):
        int8.quantize(openvino_model(small_model), calibration, (pixels, np.zeros(len(pixels))), threshold)
