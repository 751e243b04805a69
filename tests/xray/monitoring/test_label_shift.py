"""The label-shift test (xray.monitoring.performance.label_shift) on probabilities and ood_score together: val
re-weighted by its labels, its level when only the prevalence changes, what it refuses that the probabilities alone
let pass, val's images beyond the out-of-distribution boundary left out of its reference, what it does without the
inputs it needs, and the verdict that carries it."""

import re
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

from xray.monitoring import prediction_log
from xray.monitoring.performance import estimation
from xray.monitoring.performance.estimation import Reference, Settings
from xray.monitoring.performance.label_shift import label_shift_test

PREVALENCE = 0.74  # val's, the default recipe's
SEPARATION = 1.6
SCORE_MEANS = (-1.3, -1.0)  # log ood_score of NORMAL and PNEUMONIA: the detector tells the classes apart a little
MONDAY = datetime(2026, 11, 23, 9, tzinfo=timezone.utc)


def draw(rng, n: int, prevalence: float, normal_scores: float = 0.0, score_means=SCORE_MEANS):
    """(probability, ood_score, label) of ``n`` images of a world whose probability is calibrated at val's prevalence
    and whose ood_score depends on the class beyond what the probability says; ``normal_scores``: NORMAL images that
    many log units further from train for the detector (the model sees them as before)."""
    y = (rng.random(n) < prevalence).astype(int)
    logit = rng.normal(np.where(y == 1, SEPARATION, -SEPARATION), 1.0)
    p = 1 / (1 + np.exp(-(2 * SEPARATION * logit + np.log(PREVALENCE / (1 - PREVALENCE)))))
    s = rng.lognormal(np.where(y == 1, score_means[1], score_means[0] + normal_scores), 0.5)
    return p, s, y


def answered(p, s, y=None):
    """The answers of a period: its images at most 1 (the others are flagged out of distribution)."""
    return p[s <= 1], s[s <= 1]


def test_val_reweighted_by_its_labels_is_the_label_shifted_population_for_the_scores_too():
    """The score says something of the class that the probability does not: weights from the probability alone
    would leave val's scores 0.027 from a population of 10% PNEUMONIA; by label, only the sampling remains."""
    rng = np.random.default_rng(0)
    val_p, val_s, val_y = draw(rng, 40_000, PREVALENCE)
    p, s = answered(*draw(rng, 40_000, 0.1))
    test = label_shift_test(p, val_p, 20, 0, s, val_s, val_y)
    assert test.score_distance < 0.018 and test.distance < 0.018 and abs(test.prevalence - 0.1) < 0.01


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
        "keeps no val labels": (s, val_s, None),
        "keeps no val labels aligned": (s, val_s, val_y[:-1]),
        "1 answers without one": (np.r_[s[:-1], np.nan], val_s, val_y),
        "not aligned with the probabilities": (s[:-1], val_s, val_y),
        "fewer than 20 val images answered": (s, np.r_[np.full(990, 2.0), val_s[:10]], val_y),
    }
    for why, (scores, reference, labels) in cases.items():
        test = label_shift_test(p, val_p, 100, 0, scores, reference, labels)
        assert why in test.untested and why not in test.describe()
        assert np.isnan(test.score_distance) and (test.p_value, test.distance) == (alone.p_value, alone.distance)
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
