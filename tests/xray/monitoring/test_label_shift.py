"""The label-shift test (xray.monitoring.performance.label_shift) on probabilities and ood_score together: its level
when only the prevalence changes, what it refuses that the probabilities alone let pass, val's images beyond the
out-of-distribution boundary left out of its reference, and the verdict that carries it."""

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

from xray.monitoring import prediction_log
from xray.monitoring.performance import estimation
from xray.monitoring.performance.estimation import Reference, Settings
from xray.monitoring.performance.label_shift import label_shift_test

PREVALENCE = 0.74  # val's, the default recipe's
SEPARATION = 1.6
SCORE_MEANS = (-1.3, -1.0)  # log ood_score of NORMAL and PNEUMONIA: the classes look different to the detector too
MONDAY = datetime(2026, 11, 23, 9, tzinfo=timezone.utc)


def draw(rng, n: int, prevalence: float, normal_scores: float = 0.0, score_means=SCORE_MEANS):
    """Images of a world whose probability is the exact posterior at val's prevalence and whose ood_score depends on
    the class; ``normal_scores``: NORMAL images that many log units further from train (the model sees them as
    before)."""
    y = (rng.random(n) < prevalence).astype(int)
    logit = rng.normal(np.where(y == 1, SEPARATION, -SEPARATION), 1.0)
    p = 1 / (1 + np.exp(-(2 * SEPARATION * logit + np.log(PREVALENCE / (1 - PREVALENCE)))))
    s = rng.lognormal(np.where(y == 1, score_means[1], score_means[0] + normal_scores), 0.5)
    return p, s


def answered(p, s):
    return p[s <= 1], s[s <= 1]


def test_under_label_shift_the_joint_test_keeps_its_level_where_the_plain_score_test_does_not():
    """Periods of a month (600 images) that only change the prevalence, 10% to 90%: the joint test refuses about
    as often as its level says; ood_score compared with val's as it is (the drift test) refuses the far ones."""
    rng = np.random.default_rng(11)
    joint, plain = [], []
    for index, prevalence in enumerate(np.tile(np.arange(1, 10) / 10, 2)):
        val_p, val_s = draw(rng, 1000, PREVALENCE)
        p, s = answered(*draw(rng, 600, prevalence))
        joint.append(label_shift_test(p, val_p, 200, index, s, val_s).p_value)
        plain.append(ks_2samp(s, val_s).pvalue)
    assert sum(value < 0.01 for value in joint) <= 1 and np.median(joint) > 0.2
    assert sum(value < 0.01 for value in plain) >= 6  # 10-30% PNEUMONIA, twice: NORMAL images score lower


def test_normal_images_that_moved_for_the_detector_are_refused_where_the_probabilities_pass():
    rng = np.random.default_rng(0)
    val_p, val_s = draw(rng, 1000, PREVALENCE)
    p, s = answered(*draw(rng, 600, 0.3, normal_scores=0.4))
    test = label_shift_test(p, val_p, 200, 0, s, val_s)
    assert test.p_value < 0.01 and test.score_distance > 0.15 and abs(test.prevalence - 0.3) < 0.05
    assert label_shift_test(p, val_p, 200, 0).p_value > 0.2  # the probabilities alone are val's re-weighted
    assert "ood_score 0.2" in test.describe() and test.describe().startswith("Kolmogorov-Smirnov D = 0.0")


def test_vals_images_beyond_the_boundary_are_not_in_the_reference_of_answers():
    """A detector that flags 14% of val: a period's answers (its images at most 1) are val's answered ones
    re-weighted; the same period with its flagged images counted as answers is not."""
    rng = np.random.default_rng(0)
    means = (-0.7, -0.5)
    val_p, val_s = draw(rng, 1000, PREVALENCE, score_means=means)
    assert 0.1 < (val_s > 1).mean() < 0.2
    p, s = draw(rng, 600, 0.5, score_means=means)
    answered_p, answered_s = answered(p, s)
    assert label_shift_test(answered_p, val_p, 200, 0, answered_s, val_s).p_value > 0.05
    assert label_shift_test(p, val_p, 200, 0, s, val_s).p_value < 0.01


def test_scores_that_are_missing_or_not_vals_leave_the_probabilities_alone_tested():
    rng = np.random.default_rng(1)
    val_p, val_s = draw(rng, 1000, PREVALENCE)
    p, s = answered(*draw(rng, 300, 0.5))
    alone = label_shift_test(p, val_p, 100, 0)
    for scores, reference in ((None, val_s), (s, None), (np.r_[s[:-1], np.nan], val_s), (s, val_s[:-1])):
        test = label_shift_test(p, val_p, 100, 0, scores, reference)
        assert np.isnan(test.score_distance) and test.p_value == alone.p_value and test.distance == alone.distance


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


def test_the_verdict_pools_the_month_and_says_which_quantity_is_unlike_vals():
    """Weeks of 150 whose NORMAL images sit a little further from train for the detector (not enough for the drift
    test on that week): the month is refused, its reason giving both distances; weeks that only change their
    prevalence pass."""
    reasons = {}
    for moved in (0.0, 0.2):
        rng = np.random.default_rng(4)
        val_p, val_s = draw(rng, 1000, PREVALENCE)
        profile = type("Profile", (), {"val_probabilities": val_p, "val_scores": val_s, "alpha": 0.01})
        profile.val_ood_fraction = float((val_s > 1).mean())
        weeks = [_log(*draw(rng, 150, q, normal_scores=moved), w, 1000 * w) for w, q in enumerate((0.5, 0.4, 0.6, 0.5))]
        table = estimation.estimate(pd.concat(weeks), {"3": Reference.of(profile)}, "week", Settings(samples=200))
        reasons[moved] = table.loc[table["subgroup"] == "", "reasons"].tolist()
    assert reasons[0.0] == ["", "", "", ""]
    assert reasons[0.2][0] == ""  # a week of 150: neither test sees it
    assert reasons[0.2][3].startswith("calibration: this period's and the 444 earlier answers are unlike val's at any ")
    assert "prevalence (Kolmogorov-Smirnov D = 0.0" in reasons[0.2][3] and "drift" not in reasons[0.2][3]
