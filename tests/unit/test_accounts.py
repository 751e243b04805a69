"""Who may do what on a tracking server with accounts: the team stack's MLflow rule (infra.mlflow_auth), a refusal
turned into one line (a gate promotion by the trainer, a decision by the wrong account), and the record naming the
signed-in account rather than a typed name. The servers themselves: tests/pipeline/test_team_stack.py."""

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST

from infra import mlflow_auth
from xray.config import RegistryConfig
from xray.errors import ConfigError
from xray.registry import gate, promotion, store, tracking

ALIAS = "/api/2.0/mlflow/registered-models/alias"
SET_TAG = "/api/2.0/mlflow/model-versions/set-tag"
DENIED = (
    "API request to endpoint /api/2.0/mlflow/registered-models/alias failed with error code 403 != 200. Response "
    "body: 'Permission denied: moving the alias 'champion' of registered model 'm' needs MANAGE on it'"
)


@pytest.mark.parametrize(
    "method, path, params, needs",
    [
        ("POST", ALIAS, {"name": "m", "alias": "champion", "version": "2"}, "moving the alias 'champion'"),
        ("DELETE", ALIAS, {"name": "m", "alias": "champion"}, "moving the alias 'champion'"),
        ("POST", "/ajax-api/2.0/mlflow/registered-models/alias", {"alias": "champion"}, "moving the alias"),
        ("POST", ALIAS, {"name": "m", "alias": "candidate", "version": "2"}, None),  # the trainer's to set
        ("POST", SET_TAG, {"name": "m", "key": "approval", "value": "approved"}, "setting approval='approved'"),
        ("POST", SET_TAG, {"name": "m", "key": "approval", "value": "rejected"}, "setting approval='rejected'"),
        ("POST", SET_TAG, {"name": "m", "key": "approval", "value": "pending"}, None),  # the gate's, in training
        ("POST", SET_TAG, {"name": "m", "key": "test_auc", "value": "0.9"}, None),
        ("DELETE", "/api/2.0/mlflow/model-versions/delete-tag", {"key": "approval"}, "removing the tag approval"),
        ("GET", ALIAS, {"name": "m", "alias": "champion"}, None),  # reading the champion is anyone's
    ],
)
def test_only_champion_moves_and_decisions_need_manage(method, path, params, needs):
    action = mlflow_auth.needs_manage(method, path, params)
    assert (action is None) if needs is None else (needs in action)


def test_the_protected_aliases_follow_the_environment(monkeypatch):
    monkeypatch.setenv("XRAY_MLFLOW_PROTECTED_ALIASES", "production, champion")
    assert mlflow_auth.needs_manage("POST", ALIAS, {"alias": "production"}) == "moving the alias 'production'"
    assert mlflow_auth.LOCK_SUFFIX == store.LOCK_SUFFIX  # a promotion lock stays its creator's to delete


def test_a_refusal_is_the_servers_sentence_and_anything_else_is_not_one():
    assert tracking.refusal(MlflowException(DENIED, error_code=PERMISSION_DENIED)).startswith(
        "Permission denied: moving the alias 'champion'"
    )
    assert tracking.refusal(MlflowException("no such version", error_code=RESOURCE_DOES_NOT_EXIST)) is None
    assert tracking.refusal(ValueError("x")) is None


def test_without_accounts_nobody_is_signed_in(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    assert tracking.authenticated_user("http://127.0.0.1:1") is None  # no username: no request is made
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
    assert tracking.authenticated_user(f"sqlite:///{tmp_path / 'm.db'}") is None  # a local store has no accounts


class RefusingClient:
    """Registers tags, but the server refuses to move an alias (the trainer on the team stack)."""

    def __init__(self):
        self.tags = {}

    def set_model_version_tag(self, name, version, key, value):
        self.tags[key] = value

    def set_registered_model_alias(self, name, alias, version):
        raise MlflowException(DENIED, error_code=PERMISSION_DENIED)


def test_a_gate_promotion_the_server_refuses_is_one_line_that_says_what_to_do(monkeypatch):
    from contextlib import nullcontext

    monkeypatch.setattr(store, "promotion_lock", lambda client, name: nullcontext())
    monkeypatch.setattr(store, "current_champion", lambda client, name, alias: (None, None))
    decision = gate.PromotionDecision(promoted=True, reason="no champion", previous_champion=None)
    with pytest.raises(ConfigError) as raised:
        promotion.promote(RefusingClient(), "m", "3", "champion", {"test_auc": 0.9}, decision)
    message = str(raised.value)
    assert "\n" not in message and "v3 passed the gate, but MLflow refused to make it champion" in message
    assert "needs MANAGE" in message and "registry.require_approval: true" in message


@pytest.fixture
def decided(monkeypatch):
    """launch.decide with the decision itself recorded instead of made; ``signed_in`` is the server's account."""
    from pipelines import launch

    calls, signed_in = [], {"user": None}
    monkeypatch.setattr(launch.tracking, "authenticated_user", lambda uri: signed_in["user"])
    monkeypatch.setattr(launch.promotion, "approve", lambda client, registry, v, who, why: calls.append(who) or {})

    class Version:
        tags = {}

    monkeypatch.setattr(launch.MlflowClient, "get_model_version", lambda self, name, version: Version())
    config = launch.PipelineConfig(registry=RegistryConfig(tracking_uri="http://127.0.0.1:1"))
    return lambda reviewer: launch.decide(config, "approve", "2", reviewer, "checked"), calls, signed_in


def test_the_record_names_the_signed_in_account_not_a_typed_name(decided):
    decide, calls, signed_in = decided
    with pytest.raises(ConfigError, match="approve needs --reviewer NAME: the MLflow server .* has no accounts"):
        decide(None)
    decide("Dr. Alice")  # no accounts: the typed name is all there is
    signed_in["user"] = "reviewer"
    decide(None)
    decide("reviewer")
    with pytest.raises(ConfigError, match="--reviewer Dr. Alice is not the MLflow account signed in \\(reviewer\\)"):
        decide("Dr. Alice")
    assert calls == ["Dr. Alice", "reviewer", "reviewer"]


def test_a_decision_the_server_refuses_is_one_line_naming_the_account(decided, monkeypatch):
    from pipelines import launch

    decide, _, signed_in = decided
    signed_in["user"] = "trainer"

    def refuse(client, registry, version, who, why):
        raise MlflowException(DENIED, error_code=PERMISSION_DENIED)

    monkeypatch.setattr(launch.promotion, "approve", refuse)
    with pytest.raises(ConfigError) as raised:
        decide(None)
    assert str(raised.value).startswith("MLflow refused the approve by account 'trainer': Permission denied: moving")


def test_a_registry_config_without_approval_keeps_promoting_by_itself():
    assert RegistryConfig().require_approval is False  # today's automatic promotion, unless a stack needs a person
