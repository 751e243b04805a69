from xray.registry import decide


def test_first_version_is_promoted_when_sensitive_enough():
    assert decide(0.9, 0.96, 0.95, None, None).promoted


def test_low_sensitivity_is_never_promoted():
    decision = decide(0.99, 0.90, 0.95, None, None)
    assert not decision.promoted and "min_sensitivity" in decision.reason


def test_auc_must_not_regress_against_champion():
    assert decide(0.95, 0.97, 0.95, "3", 0.95).promoted
    decision = decide(0.94, 0.97, 0.95, "3", 0.95)
    assert not decision.promoted and "champion v3" in decision.reason
