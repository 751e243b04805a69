"""int8 with accuracy control (xray.serving.runtimes.int8) on a small model: NNCF quantizes it, the val control
passes or says why not, and the recipe is recorded. Its speed and test AUC on a registered version:
benchmarks/cpu_runtimes.py --int8 (docs/BENCHMARKS.md "int8")."""

import json

import numpy as np
import pytest

from support import cpu_reporting
from xray.serving import bundle
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


@pytest.fixture(scope="module")
def passed(small_model, data):
    """The small model quantized with the default recipe on ``data`` (it passes; the first test checks it)."""
    calibration, val, threshold = data
    return int8.quantize(openvino_model(small_model), calibration, val, threshold, int8.Recipe(subset_size=40))


@pytest.mark.slow
def test_int8_passes_its_val_control_and_carries_the_figures_it_passed(passed, data):
    import openvino as ov

    _, val, _ = data
    outcome = passed
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


@pytest.mark.slow
def test_a_control_int8_cannot_meet_leaves_no_model_and_says_why(small_model, data, capsys):
    calibration, val, threshold = data
    recipe = int8.Recipe(subset_size=40, min_labels_unchanged=1.01)  # no model keeps more than all its labels
    capsys.readouterr()
    outcome = int8.quantize(openvino_model(small_model), calibration, val, threshold, recipe)
    printed = capsys.readouterr()
    assert printed.out == "" and "Statistics collection" in printed.err  # NNCF's progress kept off stdout
    assert outcome.model is None and not outcome.passed
    assert "of val labels unchanged at threshold" in outcome.reason and "101.0% needed" in outcome.reason
    assert outcome.val_labels_unchanged is not None and outcome.figures()["passed"] is False


@pytest.mark.slow
def test_an_outcome_saved_is_the_outcome_loaded_as_the_version_and_the_artifact_store_hold_it(passed, tmp_path):
    int8.save(passed, tmp_path / "passed")
    assert sorted(p.name for p in (tmp_path / "passed").iterdir()) == ["int8.json", "model.bin", "model.xml"]
    loaded = int8.load(tmp_path / "passed")
    assert loaded.figures() == passed.figures() and loaded.state == "passed"
    assert any(op.get_type_name() == "FakeQuantize" for op in loaded.model.get_ops())
    failed = int8.Int8Outcome(None, "val AUC lost", passed.recipe, 0.9, 0.8, 0.99, 3.0, {"val": 5})
    int8.save(failed, tmp_path / "failed")
    assert int8.load(tmp_path / "failed").figures() == failed.figures()
    assert int8.load(tmp_path / "failed").state == "failed: val AUC lost"
    off = int8.Int8Outcome.not_made(passed.recipe)
    int8.save(off, tmp_path / "off")
    assert int8.load(tmp_path / "off").state == "not made" and off.card_line() == int8.NOT_MADE


def first_two_convolutions(model) -> list[list[str]]:
    """The kinds of the inputs (activation, weights) of the model's first two convolutions, in order."""
    convolutions = [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"][:2]
    return [[value.get_node().get_type_name() for value in op.input_values()] for op in convolutions]


@pytest.mark.slow
def test_the_in_model_preprocessing_stays_fp32_unless_the_recipe_says_otherwise(small_model, data, passed):
    calibration, val, threshold = data
    model = openvino_model(small_model)
    preprocessing = int8.preprocessing_operations(model)
    assert preprocessing[-1].startswith("Convolution") and len(preprocessing) >= 2  # the rescaling, then the conv
    kept = passed  # the default recipe
    assert kept.passed and kept.figures()["recipe"]["preprocessing_fp32"] is True
    first, second = first_two_convolutions(kept.model)
    assert first == ["Add", "Constant"] and second[0] == "FakeQuantize"  # fp32 in and weights; the next one int8
    quantized = int8.quantize(model, calibration, val, threshold, int8.Recipe(subset_size=40, preprocessing_fp32=False))
    assert first_two_convolutions(quantized.model)[0][0] == "FakeQuantize"


@pytest.mark.slow
def test_the_ignored_scope_is_applied_and_recorded(small_model, data):
    calibration, val, threshold = data
    recipe = int8.Recipe(subset_size=40, ignored_types=("Convolution",))
    outcome = int8.quantize(openvino_model(small_model), calibration, val, threshold, recipe)
    assert outcome.passed and outcome.figures()["recipe"]["ignored_types"] == ("Convolution",)
    inputs = {
        op.get_friendly_name(): (op.get_type_name(), [value.get_node().get_type_name() for value in op.input_values()])
        for op in outcome.model.get_ops()
        if op.get_type_name() in ("Convolution", "MatMul")
    }
    # The convolutions stay fp32 (no FakeQuantize on their inputs, their weights plain constants); the head is int8.
    convolutions = [kinds for kind, kinds in inputs.values() if kind == "Convolution"]
    assert len(convolutions) == 2 and all(k[0] != "FakeQuantize" and k[1] == "Constant" for k in convolutions)
    assert [kinds[0] for kind, kinds in inputs.values() if kind == "MatMul"] == ["FakeQuantize"]


@pytest.mark.slow  # converts the model to OpenVINO first
def test_val_images_of_one_class_are_refused(small_model, data):
    calibration, (pixels, _), threshold = data
    with pytest.raises(ValueError, match="both classes"):
        int8.quantize(openvino_model(small_model), calibration, (pixels, np.zeros(len(pixels))), threshold)


@pytest.fixture
def no_bf16_cpu(monkeypatch):
    """This machine's kind of CPU as OpenVINO reports it (AVX2, no BF16)."""
    cpu_reporting(monkeypatch, ["FP32", "INT8"])


@pytest.fixture
def bf16_cpu(monkeypatch):
    """An AVX-512 BF16 CPU as OpenVINO reports it (BF16 and INT8 kernels)."""
    cpu_reporting(monkeypatch, ["BF16", "FP32", "INT8"])


def test_warm_up_rates_time_each_runtime_after_one_call_and_name_the_faster():
    from xray.serving.predictor import warm_up_rates

    now = [0.0]
    calls = {"slow": 0, "fast": 0}

    def runtime(name, seconds):
        def forward(pixels):
            assert pixels.shape == (8, 16, 16, 3)
            calls[name] += 1
            now[0] += seconds

        return forward

    rates = warm_up_rates({"slow": runtime("slow", 0.4), "fast": runtime("fast", 0.1)}, 16, clock=lambda: now[0])
    assert calls == {"slow": 4, "fast": 4}  # one warm-up call, then three timed
    assert rates == {"slow": 20.0, "fast": 80.0} and max(rates, key=rates.get) == "fast"


@pytest.mark.slow
def test_auto_measures_int8_against_bf16_where_the_cpu_has_both_and_runs_the_faster(
    small_model, data, passed, tmp_path, bf16_cpu
):
    _, val, threshold = data
    predictor = bundle.read(version_with_int8(small_model, data, passed, tmp_path / "v8"))
    chosen = predictor.use_runtime("auto")
    rates = predictor.runtime_rates
    assert set(rates) == {"openvino int8", "openvino bf16"} and all(rate > 0 for rate in rates.values())
    assert chosen == max(rates, key=rates.get) == predictor.runtime
    assert predictor.probabilities(val[0]).shape == (len(val[0]),)
    without = bundle.read(version_folder(tmp_path / "v9", small_model, threshold))
    assert without.use_runtime("auto") == "openvino bf16" and without.runtime_rates == {}  # one candidate: no warm-up


def version_with_int8(model, data, outcome, folder):
    """A version's data/ (:func:`version_folder`) with ``outcome``, the int8 model that passed its control on ``data``."""
    written = version_folder(folder, model, data[2])
    bundle.write_int8(written, outcome)
    return written


def version_folder(folder, model, threshold: float):
    """A version's data/ as registration writes it (the Keras model and serving.json), without the profile."""
    data = folder / bundle.DATA_DIR
    data.mkdir(parents=True)
    model.save(data / bundle.KERAS_FILE)
    (data / bundle.CONFIG_FILE).write_text(json.dumps({"threshold": threshold, "image_size": SIZE, "version": "7"}))
    return data


@pytest.mark.slow
def test_a_version_with_int8_runs_it_under_auto_and_its_files_are_in_its_digest(
    small_model, data, passed, tmp_path, no_bf16_cpu
):
    _, val, threshold = data
    folder = version_with_int8(small_model, data, passed, tmp_path / "v7")
    listed = bundle.manifest(tmp_path / "v7")
    assert f"  {bundle.DATA_DIR}/int8/model.xml\n" in listed and f"  {bundle.DATA_DIR}/int8/model.bin\n" in listed
    assert json.loads((folder / "int8" / "int8.json").read_text())["val_labels_unchanged"] >= 0.995

    predictor = bundle.read(folder)
    assert predictor.use_runtime("auto") == "openvino int8"
    keras_rows = ChestXrayPredictor(small_model, threshold, SIZE).probabilities(val[0])
    int8_rows = predictor.probabilities(val[0])
    assert ((int8_rows >= threshold) == (keras_rows >= threshold)).mean() >= 0.995
    assert 1e-3 < np.abs(int8_rows - keras_rows).max() < 0.1  # int8 on random weights: close, not fp32

    with open(folder / "int8" / "model.bin", "r+b") as handle:  # the int8 weights changed after registration
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(bundle.ModelIntegrityError, match="data/int8/model.bin differs"):
        bundle.verify(tmp_path / "v7", listed, bundle.digest(listed), "7")


@pytest.mark.slow
def test_a_version_without_int8_loads_and_serves_on_keras_as_before(small_model, data, tmp_path, no_bf16_cpu):
    calibration, val, threshold = data
    folder = version_folder(tmp_path / "v6", small_model, threshold)  # registered before int8 existed
    predictor = bundle.read(folder)
    assert predictor.int8_ir is None and predictor.use_runtime("auto") == "keras f32"
    assert predictor.use_runtime("openvino") == "openvino f32"  # asked for: OpenVINO fp32, as before
    np.testing.assert_allclose(
        predictor.probabilities(val[0]),
        ChestXrayPredictor(small_model, threshold, SIZE).probabilities(val[0]),
        atol=1e-4,
    )


@pytest.mark.slow
def test_an_int8_that_failed_its_control_is_not_stored_and_says_why(small_model, data, tmp_path, no_bf16_cpu):
    calibration, val, threshold = data
    recipe = int8.Recipe(subset_size=40, min_labels_unchanged=1.01)
    outcome = int8.quantize(openvino_model(small_model), calibration, val, threshold, recipe)
    folder = version_folder(tmp_path / "v8", small_model, threshold)
    bundle.write_int8(folder, outcome)
    assert sorted(p.name for p in (folder / "int8").iterdir()) == ["int8.json"]
    figures = json.loads((folder / "int8" / "int8.json").read_text())
    assert figures["passed"] is False and "val labels unchanged" in figures["reason"]
    assert bundle.read(folder).use_runtime("auto") == "keras f32"
