"""The promotion gate's rule (xray.gate.decide) and its paired evidence."""

import numpy as np
import pytest

from xray.registry import gate
from xray.registry.gate import compare, decide, markdown, tags


def _comparison(difference: float, low: float, high: float, images: int = 624) -> dict:
    return {
        "auc_challenger": 0.95 + difference,
        "auc_champion": 0.95,
        "auc_difference": difference,
        "auc_difference_ci_low": low,
        "auc_difference_ci_high": high,
        "resamples": 1000,
        "images": images,
    }


def test_first_version_is_promoted_when_sensitive_enough():
    decision = decide(0.96, 0.95, None, {}, 0.01)
    assert decision.promoted and "no champion" in decision.reason


def test_low_sensitivity_is_rejected_even_when_auc_is_equal_or_better():
    equal = decide(0.90, 0.95, "3", {"test": _comparison(0.0, -0.004, 0.004)}, 0.01)
    assert not equal.promoted and "min_sensitivity" in equal.reason
    better = decide(0.94, 0.95, "3", {"test": _comparison(0.05, 0.03, 0.07)}, 0.01)
    assert not better.promoted


def test_clearly_better_challenger_is_promoted():
    decision = decide(0.97, 0.95, "3", {"test": _comparison(0.03, 0.015, 0.045)}, 0.01)
    assert decision.promoted and "non-inferior to champion v3" in decision.reason


@pytest.mark.parametrize("low, promoted", [(-0.0099, True), (-0.01, True), (-0.0101, False), (-0.05, False)])
def test_within_the_margin_but_not_better_follows_the_lower_bound_exactly(low, promoted):
    # Point estimate slightly worse than the champion: only the CI's lower bound against -margin decides.
    decision = decide(0.97, 0.95, "3", {"test": _comparison(-0.002, low, 0.006)}, 0.01)
    assert decision.promoted is promoted
    if not promoted:
        assert "beyond the margin 0.01" in decision.reason and "test:" in decision.reason


def test_every_gate_site_must_also_be_non_inferior():
    comparisons = {"test": _comparison(0.01, 0.0, 0.02), "site:hospital-b": _comparison(-0.04, -0.09, 0.01, 55)}
    decision = decide(0.97, 0.95, "3", comparisons, 0.01)
    assert not decision.promoted and "site:hospital-b" in decision.reason and "test:" not in decision.reason


def test_a_champion_that_cannot_be_scored_is_said_and_blocks_promotion():
    decision = decide(0.97, 0.95, "3", {}, 0.01, champion_error="MlflowException: No such artifact")
    assert not decision.promoted and "could not be scored" in decision.reason and "No such artifact" in decision.reason
    assert tags(decision)["gate.champion_error"].startswith("MlflowException")


def test_tags_and_card_carry_every_number_and_the_reason():
    decision = decide(0.97, 0.95, "3", {"test": _comparison(-0.002, -0.008, 0.004)}, 0.01)
    written = tags(decision)
    assert written["promotion_decision"] == "promoted" and written["gate.champion_version"] == "3"
    for key in (
        "auc_challenger",
        "auc_champion",
        "auc_difference",
        "auc_difference_ci_low",
        "auc_difference_ci_high",
        "images",
    ):
        assert f"gate.test.{key}" in written
    card = markdown(decision, 0.95)
    assert "| test | 624 |" in card and "-0.0080 to +0.0040" in card and "Passed the promotion gate" in card


def test_paired_ci_uses_shared_resamples():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    champion = y + rng.normal(0, 0.8, 400)
    # The same scores, shifted: identical ranking, so every shared resample gives a difference of exactly 0.
    same = compare(y, champion + 5.0, champion, 500, seed=1)
    assert same["auc_difference"] == 0 and same["auc_difference_ci_low"] == same["auc_difference_ci_high"] == 0
    # A challenger that only adds a little noise: the paired interval is far narrower than the unpaired one would be.
    noisy = champion + rng.normal(0, 0.1, 400)
    paired = compare(y, noisy, champion, 500, seed=1)
    width = paired["auc_difference_ci_high"] - paired["auc_difference_ci_low"]
    from xray.evaluation.metrics import bootstrap_ci

    single = bootstrap_ci(y, champion, (0.5,), 500, seed=1)[0]["auc"]
    assert width < 0.5 * (single[1] - single[0])
    assert paired["auc_difference_ci_low"] <= paired["auc_difference"] <= paired["auc_difference_ci_high"]


def test_compare_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="same images"):
        compare(np.array([0, 1, 1]), np.array([0.1, 0.9, 0.8]), np.array([0.2, 0.7]), 100, 0)


def test_scores_hold_labels_as_the_ints_their_field_says_so_zenml_stores_them_without_a_warning():
    import warnings

    from pydantic import TypeAdapter

    labels = np.array([0.0, 1.0, 1.0], dtype=np.float32)  # as xray.data.inputs.labels_of gives them
    scores = gate.Scores.of("1", {"test": labels}, {"test": np.array([0.1, 0.8, 0.7], dtype=np.float32)})
    assert scores.labels == {"test": [0, 1, 1]} and all(type(v) is int for v in scores.labels["test"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydantic's "serialized value may not be as expected" is a UserWarning
        TypeAdapter(gate.Scores).dump_python(scores, mode="json")
