"""The label-shift test (xray.monitoring.performance.label_shift) on probabilities and ood_score together: val
re-weighted by its labels, its level when only the prevalence changes, what it refuses that the probabilities alone
let pass, val's images beyond the out-of-distribution boundary left out of its reference, what it does without the
inputs it needs, and the verdict that carries it."""

import re
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp

from fixtures.label_shift_world import PREVALENCE, answered, draw, draw_detector
from xray.monitoring import prediction_log
from xray.monitoring.performance import estimation
from xray.monitoring.performance.estimation import Reference, Settings
from xray.monitoring.performance.label_shift import DETECTOR, label_shift_test

MONDAY = datetime(2026, 11, 23, 9, tzinfo=timezone.utc)


def test_val_reweighted_by_its_labels_is_the_label_shifted_population_for_the_scores_too():
    """The score says something of the class that the probability does not: weights from the probability alone
    would leave val's scores 0.027 from a population of 10% PNEUMONIA; by label, only the sampling remains."""
    rng = np.random.default_rng(0)
    val_p, val_s, val_y = draw(rng, 40_000, PREVALENCE)
    p, s = answered(*draw(rng, 40_000, 0.1))
    test = label_shift_test(p, val_p, 20, 0, s, val_s, val_y)
    assert test.score_distance < 0.018 and test.distance < 0.018 and abs(test.prevalence - 0.1) < 0.01
    kept = val_s <= 1
    r, q = val_p[kept].mean(), test.prevalence
    by_probability = q * val_p[kept] / r + (1 - q) * (1 - val_p[kept]) / (1 - r)
    order = np.argsort(val_s[kept])
    expected = np.cumsum(by_probability[order]) / by_probability.sum()
    observed = np.searchsorted(np.sort(s), val_s[kept][order], side="right") / len(s)
    assert np.abs(observed - expected).max() > 0.022


def test_under_label_shift_the_test_keeps_its_level_where_the_plain_score_test_does_not():
    """Months of 600 answers that only change the prevalence, 10% to 90% twice: refused about as often as the level
    says; ood_score compared with val's as it is (the drift test) refuses the far ones, as NORMAL images score lower."""
    rng = np.random.default_rng(11)
    joint, plain = [], []
    for index, prevalence in enumerate(np.tile(np.arange(1, 10) / 10, 2)):
        val_p, val_s, val_y = draw(rng, 1000, PREVALENCE)
        p, s = answered(*draw(rng, 600, prevalence))
        joint.append(label_shift_test(p, val_p, 200, index, s, val_s, val_y).p_value)
        plain.append(ks_2samp(s, val_s).pvalue)
    assert sum(value < 0.01 for value in joint) <= 1 and np.median(joint) > 0.2
    assert sum(value < 0.01 for value in plain) >= 6


def test_the_smaller_of_two_p_values_is_calibrated_not_taken_as_it_is():
    """100 label-shifted months of 300 answers, prevalence anywhere from 10% to 90%: refused at 20% about as often as
    that (0.16-0.21 over three seeds); taking the smaller of the two p-values as it is would refuse 0.30-0.43."""
    rng = np.random.default_rng(7)
    p_values = []
    for index in range(100):
        val_p, val_s, val_y = draw(rng, 600, PREVALENCE)
        p, s = answered(*draw(rng, 300, rng.uniform(0.1, 0.9)))
        p_values.append(label_shift_test(p, val_p, 100, index, s, val_s, val_y).p_value)
    assert 0.1 <= np.mean(np.array(p_values) < 0.2) <= 0.27


def test_a_month_of_ten_percent_keeps_the_level_at_2400_answers():
    rng = np.random.default_rng(5)
    p_values = []
    for index in range(10):
        val_p, val_s, val_y = draw(rng, 1000, PREVALENCE)
        p, s = answered(*draw(rng, 2400, 0.1))
        p_values.append(label_shift_test(p, val_p, 100, index, s, val_s, val_y).p_value)
    assert sum(value < 0.05 for value in p_values) <= 2


def test_normal_images_that_moved_for_the_detector_are_refused_where_the_probabilities_pass():
    rng = np.random.default_rng(0)
    val_p, val_s, val_y = draw(rng, 1000, PREVALENCE)
    p, s = answered(*draw(rng, 600, 0.3, normal_scores=0.4))
    test = label_shift_test(p, val_p, 400, 0, s, val_s, val_y)
    assert test.p_value < 0.01 and test.score_distance > 2 * test.distance
    assert label_shift_test(p, val_p, 200, 0).p_value > 0.01  # the probabilities alone are val's re-weighted
    assert re.fullmatch(r"Kolmogorov-Smirnov D = 0\.\d\d for the probabilities, ood_score 0\.\d\d, .*", test.describe())


def test_with_the_detectors_two_scores_the_smallest_of_four_p_values_keeps_its_level():
    """80 label-shifted months of 300 answers, prevalence 10-90%, tested on the probability, ood_score, content_z and
    acquisition_z: refused at 20% about as often as that (0.175-0.24 over three seeds; the smallest of the four
    p-values taken as it is: 0.46)."""
    rng = np.random.default_rng(8)
    p_values = []
    for index in range(80):
        val_p, val_s, val_y = draw_detector(rng, 1000, PREVALENCE)
        p, s = answered(*draw_detector(rng, 300, rng.uniform(0.1, 0.9)))
        test = label_shift_test(p, val_p, 100, index, s, val_s, val_y, DETECTOR)
        assert set(test.distances) == set(DETECTOR) and not test.untested
        p_values.append(test.p_value)
    assert 0.1 <= np.mean(np.array(p_values) < 0.2) <= 0.3


def test_normal_images_nearer_train_for_one_detector_are_refused_where_ood_score_does_not_see_them():
    """NORMAL images 0.5 sd lower for the acquisition detector (another exposure, nearer the mean of train): ood_score,
    the larger of the two detectors', hardly moves; acquisition_z does. Ten months of 600 answers at 30% PNEUMONIA."""
    rng = np.random.default_rng(3)
    refused = []
    for index in range(10):
        val_p, val_s, val_y = draw_detector(rng, 1000, PREVALENCE)
        p, s = answered(*draw_detector(rng, 600, 0.3, normal_acquisition=-0.5))
        every = label_shift_test(p, val_p, 400, index, s, val_s, val_y, DETECTOR)
        scored = label_shift_test(p, val_p, 400, index, s[:, 0], val_s[:, 0], val_y)
        refused.append((every.p_value < 0.01, scored.p_value < 0.01))
        assert every.distances["acquisition_z"] > every.distances["content_z"]
    assert sum(a for a, _ in refused) >= 9 and sum(b for _, b in refused) <= 5
    assert re.fullmatch(
        r"Kolmogorov-Smirnov D = 0\.\d\d for the probabilities, ood_score 0\.\d\d, content_z 0\.\d\d, "
        r"acquisition_z 0\.\d\d, against val's re-weighted to \d+% PNEUMONIA, p = .*",
        every.describe(),
    )


def test_a_score_the_answers_or_val_lack_is_not_tested_and_it_says_which():
    """A log written before it kept the detector's two scores: ood_score is tested, the two are named as untested."""
    rng = np.random.default_rng(6)
    val_p, val_s, val_y = draw_detector(rng, 1000, PREVALENCE)
    p, s = answered(*draw_detector(rng, 300, 0.5))
    unscored = s.copy()
    unscored[:, 1:] = np.nan
    test = label_shift_test(p, val_p, 100, 0, unscored, val_s, val_y, DETECTOR)
    assert test.untested == f"content_z and acquisition_z not tested: {len(p)} answers without them"
    assert list(test.distances) == ["ood_score"] and test.distances["ood_score"] == pytest.approx(
        label_shift_test(p, val_p, 100, 0, s[:, 0], val_s[:, 0], val_y).score_distance
    )
    holed = val_s.copy()
    holed[:3, 2] = np.nan
    test = label_shift_test(p, val_p, 100, 0, s, holed, val_y, DETECTOR)
    assert test.untested == "acquisition_z not tested: 3 val images without one"
    assert list(test.distances) == ["ood_score", "content_z"]
    with pytest.raises(ValueError, match="columns"):
        label_shift_test(p, val_p, 100, 0, s[:, :2], val_s, val_y, DETECTOR)
    nothing = label_shift_test([], val_p, 100, 0, [], val_s, val_y, DETECTOR)
    assert nothing.p_value == 1.0 and np.isnan(nothing.distance)
    named = label_shift_test(p, val_p, 100, 0, s[:, 0], val_s[:, 0], val_y, "ood_score")
    assert list(named.distances) == ["ood_score"]


def test_vals_images_beyond_the_boundary_are_not_in_the_reference_of_answers():
    """A detector that flags 14% of val: a period's answers are val's answered images re-weighted; the same period
    with its flagged images counted as answers is not."""
    rng = np.random.default_rng(0)
    means = (-0.7, -0.5)
    val_p, val_s, val_y = draw(rng, 1000, PREVALENCE, score_means=means)
    assert 0.1 < (val_s > 1).mean() < 0.2
    p, s, _ = draw(rng, 600, 0.5, score_means=means)
    answered_p, answered_s = answered(p, s)
    assert label_shift_test(answered_p, val_p, 200, 0, answered_s, val_s, val_y).p_value > 0.01
    assert label_shift_test(p, val_p, 400, 0, s, val_s, val_y).p_value < 0.01


def test_without_what_the_scores_need_the_probabilities_alone_are_tested_and_it_says_why():
    rng = np.random.default_rng(1)
    val_p, val_s, val_y = draw(rng, 1000, PREVALENCE)
    p, s = answered(*draw(rng, 300, 0.5))
    alone = label_shift_test(p, val_p, 100, 0)
    assert alone.untested == "" and np.isnan(alone.score_distance)
    cases = {
        "the reference profile keeps no val labels": (s, val_s, None),
        "the reference profile's val labels are not aligned with its probabilities": (s, val_s, val_y[:-1]),
        "the reference profile's val labels are not 0 and 1": (s, val_s, val_y + 1),
        "the reference profile's val labels are of one class": (s, val_s, np.ones_like(val_y)),
        "the reference profile's scores are not aligned with its probabilities": (s, val_s[:-1], val_y),
        "1 answers without one": (np.r_[s[:-1], np.nan], val_s, val_y),
        "1 val images without one": (s, np.r_[val_s[:-1], np.nan], val_y),
        "the scores are not aligned with the probabilities": (s[:-1], val_s, val_y),
        "fewer than 20 val images answered": (s, np.r_[np.full(990, 2.0), val_s[:10]], val_y),
    }
    for why, (scores, reference, labels) in cases.items():
        test = label_shift_test(p, val_p, 100, 0, scores, reference, labels)
        assert test.untested == f"ood_score not tested: {why}" and "ood_score" not in test.describe()
        assert np.isnan(test.score_distance) and np.isfinite(test.distance) and 0 < test.p_value <= 1
    unlabelled = label_shift_test(p, val_p, 100, 0, s, val_s, None)  # val's answered images, as with labels
    assert unlabelled.distance == label_shift_test(p, val_p[val_s <= 1], 100, 0).distance != alone.distance


def test_an_answer_or_a_val_image_without_a_probability_is_left_out():
    rng = np.random.default_rng(2)
    val_p, val_s, val_y = draw(rng, 1000, PREVALENCE)
    p, s = answered(*draw(rng, 300, 0.5))
    test = label_shift_test(p, val_p, 100, 0, s, val_s, val_y)
    holed = label_shift_test(
        np.r_[p, np.nan], np.r_[np.nan, val_p], 100, 0, np.r_[s, 0.5], np.r_[0.5, val_s], np.r_[1, val_y]
    )
    assert (holed.distance, holed.score_distance, holed.p_value, holed.prevalence) == (
        test.distance,
        test.score_distance,
        test.p_value,
        test.prevalence,
    )
    nothing = label_shift_test([], val_p, 100, 0, [], val_s, val_y)
    assert nothing.p_value == 1.0 and np.isnan(nothing.distance)


def _log(p, s, week: int, start: int) -> pd.DataFrame:
    n = len(p)
    table = pd.DataFrame(
        {
            "path": [f"img/{i}.jpeg" for i in range(start, start + n)],
            "sha256": [f"{i:064x}" for i in range(start, start + n)],
            "probability": p,
            "threshold": 0.5,
            "ood_score": s,
            "status": np.where(s > 1, "out_of_distribution", "ok"),
            "reason": np.where(s > 1, "image content unlike the training images", ""),
            "site": "",
            "operating_point": "version",
            "model_version": "3",
        }
    )
    table["label"] = np.where(p >= 0.5, "PNEUMONIA", "NORMAL")
    return prediction_log.log_rows(table, "batch", "/data/batch", now=MONDAY + timedelta(days=7 * week))


def test_the_verdict_refuses_the_month_and_gives_both_distances():
    """Weeks of 150 whose NORMAL images sit further from train for the detector: by the month's end the calibration is
    refused (the week alone, or pooled with the earlier ones), its reason giving both distances; weeks that only change
    their prevalence are not refused."""
    reasons = {}
    for moved in (0.0, 0.5):
        rng = np.random.default_rng(4)
        val_p, val_s, val_y = draw(rng, 1000, PREVALENCE)
        profile = SimpleNamespace(
            val_probabilities=val_p, val_scores=val_s, val_labels=val_y, alpha=0.01, val_ood_fraction=0.02
        )
        weeks = [
            _log(*draw(rng, 150, q, normal_scores=moved)[:2], w, 1000 * w) for w, q in enumerate((0.5, 0.4, 0.6, 0.5))
        ]
        table = estimation.estimate(pd.concat(weeks), {"3": Reference.of(profile)}, "week", Settings(samples=200))
        reasons[moved] = table.loc[table["subgroup"] == "", "reasons"].tolist()
    assert not any("calibration" in reason for reason in reasons[0.0])
    found = re.search(
        r"calibration: (the|this period's and the \d+ earlier) answers are unlike val's .*", reasons[0.5][3]
    )
    assert found and ", ood_score 0." in found[0]
