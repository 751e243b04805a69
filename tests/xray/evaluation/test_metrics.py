import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from xray.evaluation import metrics


def test_min_sensitivity_threshold_is_the_most_specific_that_keeps_sensitivity():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.7, 0.3, 0.65, 0.8, 0.9])
    threshold, _ = metrics.choose_threshold(y, p, "min_sensitivity", 1.0)
    assert threshold == pytest.approx(0.3)
    threshold, _ = metrics.choose_threshold(y, p, "min_sensitivity", 0.75)
    assert threshold == pytest.approx(0.65)
    out = metrics.at_threshold(y, p, threshold)
    assert out["sensitivity"] == 0.75 and out["specificity"] == 0.75


def test_min_sensitivity_takes_the_highest_threshold_among_equal_specificities():
    # Between the negatives at 0.2 and 0.9, val specificity is 2/3 for every threshold in (0.2, 0.9]; ROC corners
    # alone would offer only 0.9 (sensitivity 0.4) and 0.3 (1.0), so the policy would pick 0.3.
    y = np.array([0, 0, 0] + [1] * 10)
    p = np.array([0.1, 0.2, 0.9, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95, 0.96, 0.97, 0.98])
    threshold, description = metrics.choose_threshold(y, p, "min_sensitivity", 0.75)
    assert threshold == pytest.approx(0.5)
    out = metrics.at_threshold(y, p, threshold)
    assert out["sensitivity"] == pytest.approx(0.8) and out["specificity"] == pytest.approx(2 / 3)
    assert "sensitivity 0.800 >= 0.75" in description


def test_youden_and_fixed():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert metrics.choose_threshold(y, p, "fixed", fixed=0.3)[0] == 0.3
    threshold, _ = metrics.choose_threshold(y, p, "youden")
    assert threshold in (0.35, 0.8)


def test_at_threshold_counts():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.2, 0.7, 0.6, 0.4, 0.9])
    out = metrics.at_threshold(y, p, 0.5)
    assert out["confusion_matrix"] == [[1, 1], [1, 2]]
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["precision_PNEUMONIA"] == pytest.approx(2 / 3)
    assert out["recall_NORMAL"] == pytest.approx(1 / 2)


def test_evaluate_reports_cis_around_the_point_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(y * 0.3 + rng.random(400) * 0.7, 0, 1)
    report = metrics.evaluate(y, p, 0.5, bootstrap_samples=300, seed=1)
    assert report["auc"] == pytest.approx(roc_auc_score(y, p))
    low, high = report["ci95"]["auc"]
    assert low < report["auc"] < high and high - low < 0.2
    flat = metrics.flat_metrics("test", report)
    assert {"test_auc", "test_sensitivity", "test_specificity_at_0_5", "test_auc_ci_low", "test_brier"} <= flat.keys()


def test_cis_at_both_operating_points_bracket_their_own_estimates():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p = np.clip(y * 0.25 + rng.random(500) * 0.75, 0, 1)
    report = metrics.evaluate(y, p, 0.2, bootstrap_samples=300, seed=2)
    for block, point in (("ci95", report["at_threshold"]), ("ci95_at_0_5", report["at_0_5"])):
        for key in ("accuracy", "sensitivity", "specificity"):
            low, high = report[block][key]
            assert low <= point[key] <= high, (block, key)
    # A threshold of 0.2 and one of 0.5 give different sensitivities, so the intervals must differ.
    assert report["ci95"]["sensitivity"] != report["ci95_at_0_5"]["sensitivity"]
    flat = metrics.flat_metrics("test", report)
    assert {"test_accuracy_ci_low", "test_sensitivity_at_0_5_ci_high", "test_accuracy_at_0_5_ci_low"} <= flat.keys()
    assert "test_auc_at_0_5_ci_low" not in flat


def test_the_bootstraps_auc_is_sklearns_with_ties_and_without():
    rank_auc = metrics.rank_auc
    rng = np.random.default_rng(5)
    for size in (2, 7, 60, 500):
        y = rng.integers(0, 2, size)
        y[:2] = [0, 1]
        for p in (rng.uniform(0, 1, size), rng.integers(0, 4, size) / 3.0):  # continuous, then heavily tied
            assert rank_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert rank_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert rank_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
