"""The model card states only what was checked for the run."""

from xray.registry.card import _calibration, _val_overlap, _val_vs_test


def test_train_val_patient_overlap_is_stated_as_counted():
    assert _val_overlap({"patients_in_train_and_val": 0}).startswith("No patient is in both train and val")
    assert _val_overlap({"patients_in_train_and_val": 3}).startswith("3 patients are in both")
    assert "not counted" in _val_overlap({})


def test_val_overstates_test_only_when_above_tests_ci():
    test = {"ci95": {"auc": (0.93, 0.967)}}
    assert "overstated" in _val_vs_test({"val_auc": 0.986}, test)
    assert "overstated" not in _val_vs_test({"val_auc": 0.95}, test)


def test_calibration_sentence_follows_the_measured_ece():
    flat = {"test_ece_uncalibrated": 0.05, "test_brier_uncalibrated": 0.08, "test_brier": 0.1}
    calibration = {"method": "platt", "temperature": 0.7, "bias": 3.0}
    worse = _calibration({"flat": flat | {"test_ece": 0.13}, "calibration": calibration})
    assert "made test ECE worse" in worse and "re-fit" in worse
    better = _calibration({"flat": flat | {"test_ece": 0.02}, "calibration": calibration})
    assert "made test ECE worse" not in better and "about 80% have pneumonia" in better
    assert "not calibrated" in _calibration({"flat": flat, "calibration": {"method": "none"}})
