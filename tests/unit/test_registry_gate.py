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


class _AliasClient:
    """Fails the first alias writes the way the SQL stores do when another run inserted the alias first."""

    def __init__(self, failures, message="(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.alias"):
        self.failures, self.message, self.calls, self.aliases = failures, message, 0, {}

    def set_registered_model_alias(self, name, alias, version):
        from mlflow.exceptions import MlflowException

        self.calls += 1
        if self.calls <= self.failures:
            raise MlflowException(self.message)
        self.aliases[alias] = version


def test_alias_write_that_lost_an_insert_race_is_retried():
    from xray.registry import set_alias

    client = _AliasClient(failures=2)
    set_alias(client, "m", "champion", "2", pause_s=0)
    assert client.aliases == {"champion": "2"} and client.calls == 3


def test_other_alias_errors_and_a_persistent_conflict_are_raised():
    import pytest
    from mlflow.exceptions import MlflowException

    from xray.registry import set_alias

    with pytest.raises(MlflowException, match="permission"):
        set_alias(_AliasClient(failures=1, message="permission denied"), "m", "champion", "2", pause_s=0)
    client = _AliasClient(failures=10)
    with pytest.raises(MlflowException, match="UNIQUE"):
        set_alias(client, "m", "champion", "2", attempts=3, pause_s=0)
    assert client.calls == 3
