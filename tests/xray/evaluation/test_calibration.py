"""Calibration: fitted on val, lowers ECE, keeps the ranking, and lives inside the saved model."""

import numpy as np
import pytest

from xray.config.evaluate import EvaluateConfig
from xray.errors import DataQualityError
from xray.evaluation.calibration import Calibration, expected_calibration_error, fit_calibration, sigmoid
from xray.evaluation.recipes import calibrate_and_evaluate, grouped_split, recalibrated_site_metrics, site_metrics


def _scores(n: int, seed: int, scale: float = 4.0, shift: float = 1.5):
    """Labels and logits of a miscalibrated model: the true log-odds are 2z, the model says scale*z + shift."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = (2 * y - 1) * 1.0 + rng.normal(0, 1, n)
    return y, scale * z + shift


# Temperature scaling can only fix over- or under-confidence; Platt scaling also a shifted prior.
@pytest.mark.parametrize("method, shift", [("platt", 1.5), ("temperature", 0.0)])
def test_calibration_fitted_on_one_set_lowers_ece_on_another(method, shift):
    y_val, z_val = _scores(3000, seed=0, shift=shift)
    y_test, z_test = _scores(3000, seed=1, shift=shift)
    calibration = fit_calibration(y_val, z_val, method)
    before = expected_calibration_error(y_test, sigmoid(z_test))
    after = expected_calibration_error(y_test, calibration.probability(z_test))
    assert before > 0.05 and after < before / 2
    # A monotone map: the ranking, hence AUC, is unchanged.
    assert np.array_equal(np.argsort(z_test, kind="stable"), np.argsort(calibration.probability(z_test), kind="stable"))


def test_platt_recovers_the_true_map_and_temperature_has_no_bias():
    y, z = _scores(20000, seed=2, scale=4.0, shift=1.5)
    platt = fit_calibration(y, z, "platt")
    # True log-odds 2 * (z - 1.5) / 4 = z / 2 - 0.75.
    assert platt.temperature == pytest.approx(2.0, rel=0.05) and platt.bias == pytest.approx(-0.75, abs=0.05)
    assert fit_calibration(y, z, "temperature").bias == 0.0
    assert fit_calibration(y, z, "none") == Calibration("none")


def test_calibration_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="both classes"):
        fit_calibration(np.ones(10), np.linspace(-1, 1, 10))
    with pytest.raises(ValueError, match="does not rank"):
        fit_calibration(np.array([1, 1, 0, 0] * 20), np.tile([-2.0, -1.0, 1.0, 2.0], 20))
    with pytest.raises(ValueError, match="unknown calibration"):
        fit_calibration(np.array([0, 1]), np.array([0.0, 1.0]), "isotonic")


def test_ece_by_hand():
    y = np.array([0, 1, 1, 1])
    p = np.array([0.1, 0.9, 0.9, 0.5])
    # bins: 0.1 -> |0 - 0.1|; 0.9 x2 -> |2 - 1.8|; 0.5 -> |1 - 0.5|: (0.1 + 0.2 + 0.5) / 4
    assert expected_calibration_error(y, p) == pytest.approx(0.2)
    assert expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error(y, p + 1)


def test_threshold_is_chosen_on_calibrated_val_and_test_reports_before_and_after():
    y_val, z_val = _scores(2000, seed=3)
    y_test, z_test = _scores(1000, seed=4)
    result = calibrate_and_evaluate(y_val, z_val, y_test, z_test, EvaluateConfig(bootstrap_samples=100), seed=0)
    flat = result["flat"]
    assert flat["test_ece"] < flat["test_ece_uncalibrated"] and flat["test_brier"] < flat["test_brier_uncalibrated"]
    assert flat["test_ece_ci_low"] <= flat["test_ece"] <= flat["test_ece_ci_high"]
    # The threshold is a calibrated probability at which val sensitivity is >= 0.95.
    p_val = result["calibration"].probability(z_val)
    assert ((p_val >= result["threshold"])[y_val == 1]).mean() >= 0.95
    assert flat["test_auc"] == pytest.approx(result["test_uncalibrated"]["auc"])


@pytest.mark.slow
def test_calibrated_keras_model_outputs_the_fitted_map_and_survives_save_and_load(tmp_path):
    import keras

    from xray.config.model import ModelConfig
    from xray.model.network import build_model, calibrated_model, logit_model

    model, _ = build_model(
        ModelConfig(backbone="mobilenetv3large", image_size=32, dense_units=4, input_normalization="per_image"), None
    )
    images = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    z = logit_model(model).predict(images, verbose=0).ravel()
    assert np.allclose(sigmoid(z), model.predict(images, verbose=0).ravel(), atol=1e-6)
    calibration = Calibration("platt", temperature=2.5, bias=-0.4)
    calibrated = calibrated_model(model, calibration.temperature, calibration.bias)
    calibrated.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")  # built-in layers only: no custom objects
    assert np.allclose(reloaded.predict(images, verbose=0).ravel(), calibration.probability(z), atol=1e-6)
    with pytest.raises(ValueError, match="already calibrated"):
        calibrated_model(reloaded, 1.0, 0.0)


def test_site_metrics_carry_a_ci_for_each_number():
    y, z = _scores(400, seed=5)
    metrics = site_metrics(y, sigmoid(z / 4), 0.5, 200, seed=0)
    for name in ("auc", "accuracy", "sensitivity", "specificity", "ece"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
    assert metrics["images"] == 400
    from xray.errors import DataQualityError

    with pytest.raises(DataQualityError, match="both classes"):
        site_metrics(np.ones(5), np.full(5, 0.9), 0.5, 100, 0)


def test_grouped_split_keeps_patients_whole_and_both_classes_on_each_side():
    y = np.array([0] * 30 + [1] * 30)
    groups = [f"p{i // 3}" for i in range(60)]  # 3 images per patient
    mask = grouped_split(groups, 0.3, seed=0, y=y)
    for group in set(groups):
        members = mask[[g == group for g in groups]]
        assert members.all() or not members.any()
    assert set(y[mask]) == set(y[~mask]) == {0, 1}
    assert 0.2 < mask.mean() < 0.4
    with pytest.raises(ValueError, match="fraction"):
        grouped_split(groups, 1.5, 0, y)


def test_recalibration_on_the_site_share_lowers_its_ece_on_the_rest():
    # A site where the model is badly off: the same ranking, another prevalence and scale.
    y, z = _scores(1200, seed=6, scale=6.0, shift=3.0)
    groups = [f"image:{i}" for i in range(len(y))]
    evaluate = EvaluateConfig(bootstrap_samples=100)
    recalibrated = recalibrated_site_metrics(y, z, groups, 0.3, evaluate, seed=0)
    assert recalibrated["calibration_images"] + recalibrated["measured_images"] == 1200
    mask = grouped_split(groups, 0.3, 0, y)
    as_is = expected_calibration_error(y[~mask], sigmoid(z[~mask]))
    assert recalibrated["metrics"]["ece"] < as_is / 2


def test_a_site_share_the_model_ranks_backwards_is_one_clear_error():
    from xray.errors import DataQualityError

    y = np.array([0, 1] * 40)
    logits = np.where(y == 1, -1.0, 1.0) + np.random.default_rng(0).normal(0, 0.1, 80)
    with pytest.raises(DataQualityError, match="cannot re-fit the calibration.*does not rank"):
        recalibrated_site_metrics(
            y, logits, [f"image:{i}" for i in range(80)], 0.5, EvaluateConfig(min_recalibration_per_class=10), seed=0
        )


def test_a_calibration_share_too_small_is_refused_naming_the_setting():
    """14 images (7 per class) re-fitted a site to temperature 0.05 and threshold 0.9997: refused, in one line."""
    rng = np.random.default_rng(1)
    y = np.array([0, 1] * 14)
    logits = (2 * y - 1) * 1.5 + rng.normal(0, 1, len(y))
    with pytest.raises(DataQualityError, match=r"evaluate.min_recalibration_per_class=30 of a class"):
        recalibrated_site_metrics(y, logits, [f"image:{i}" for i in range(len(y))], 0.5, EvaluateConfig(), seed=0)


def test_a_recalibration_that_is_not_shown_to_meet_the_sensitivity_floor_says_so(caplog):
    """The operating point re-fitted on the share is measured on the rest: its sensitivity's CI against the floor."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    weak = (2 * y - 1) * 0.4 + rng.normal(0, 1, 300)  # a model that barely ranks this site
    strong = (2 * y - 1) * 4.0 + rng.normal(0, 1, 300)
    groups = [f"image:{i}" for i in range(300)]
    evaluate = EvaluateConfig(bootstrap_samples=200)
    with caplog.at_level("WARNING"):
        poor = recalibrated_site_metrics(y, weak, groups, 0.5, evaluate, seed=0)
    assert not poor["meets_policy"] and "is not shown to meet evaluate.min_sensitivity 0.95" in poor["policy"]
    assert "recalibrated operating point" in caplog.text
    good = recalibrated_site_metrics(y, strong, groups, 0.5, evaluate, seed=0)
    assert good["meets_policy"] == (good["metrics"]["sensitivity_ci_low"] >= 0.95)
    assert min(good["calibration_counts"].values()) >= 30


def test_the_parameter_covariance_is_the_spread_of_the_fit_over_resampled_calibration_sets():
    """What a site's band draws (estimation._perturbed): the inverse Fisher information at the fit, from the logits
    alone, against the spread of (1 / temperature, bias) refitted on 300 bootstrap resamples of a 300-image set."""
    from xray.evaluation.calibration import fit_calibration, parameter_covariance

    y, z = _scores(300, seed=8, scale=2.0, shift=-1.0)
    fitted = fit_calibration(y, z, "platt")
    covariance = np.array(parameter_covariance(fitted, z))
    rng = np.random.default_rng(0)
    refits = []
    for _ in range(300):
        pick = rng.integers(0, len(y), len(y))
        again = fit_calibration(y[pick], z[pick], "platt")
        refits.append([1 / again.temperature, again.bias])
    empirical = np.cov(np.array(refits).T)
    np.testing.assert_allclose(np.sqrt(np.diag(covariance)), np.sqrt(np.diag(empirical)), rtol=0.25)
    assert np.shape(parameter_covariance(fit_calibration(y, z, "temperature"), z)) == (1, 1)
    assert parameter_covariance(fit_calibration(y, z, "none"), z) is None
