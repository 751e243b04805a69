"""Who may do what on a tracking server with accounts: the team stack's MLflow rule (infra.mlflow_auth), a refusal
turned into one line (a gate promotion by the trainer, a decision by the wrong account), and the record naming the
signed-in account rather than a typed name. The servers themselves: tests/pipelines/test_team_stack.py."""

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST

from infra import mlflow_auth
from xray.config.registry import RegistryConfig
from xray.errors import ConfigError
from xray.registry import gate, promotion, store, tracking

DENIED = (
    "API request to endpoint /api/2.0/mlflow/registered-models/alias failed with error code 403 != 200. Response "
    "body: 'Permission denied: moving the alias 'champion' of registered model 'm' needs MANAGE on it'"
)


PENDING = mlflow_auth.Version(tags={"approval": "pending", "test_auc": "0.9"})
SEALED = mlflow_auth.Version(
    tags={"model_sha256": "ab" * 32, "promotion_decision": "promoted", "history.1": "{}"},
    aliases=["champion"],
    description="# card",
)


@pytest.mark.parametrize(
    "operation, message, version, needs",
    [
        ("SetRegisteredModelAlias", {"name": "m", "alias": "champion", "version": "2"}, PENDING, "moving the alias"),
        ("DeleteRegisteredModelAlias", {"name": "m", "alias": "champion"}, None, "removing the alias 'champion'"),
        ("SetRegisteredModelAlias", {"alias": "candidate", "version": "2"}, PENDING, None),  # the gate's, in training
        ("SetRegisteredModelAlias", {"alias": "candidate", "version": "1"}, SEALED, "not pending approval"),
        ("DeleteRegisteredModelAlias", {"alias": "candidate"}, None, "removing the alias 'candidate'"),
        ("SetRegisteredModelAlias", {"alias": "staging", "version": "1"}, SEALED, None),  # anyone's own aliases
        ("SetModelVersionTag", {"key": "approval", "value": "approved"}, PENDING, "changing the tag approval"),
        ("SetModelVersionTag", {"key": "approval", "value": "approved"}, None, "setting approval='approved'"),
        ("SetModelVersionTag", {"key": "approval", "value": "pending"}, mlflow_auth.Version(), None),
        ("SetModelVersionTag", {"key": "history.20261206", "value": "{}"}, PENDING, "writing history.20261206"),
        ("SetModelVersionTag", {"key": "promotion_decision", "value": "promoted"}, SEALED, None),  # the same value
        ("SetModelVersionTag", {"key": "promotion_decision", "value": "x"}, SEALED, "changing the tag promotion_"),
        ("SetModelVersionTag", {"key": "model_sha256", "value": "cd"}, SEALED, "changing the tag model_sha256"),
        ("SetModelVersionTag", {"key": "model_sha256", "value": "cd"}, PENDING, None),  # registration seals once
        ("SetModelVersionTag", {"key": "promotion_decision", "value": "promoted"}, PENDING, "a reviewer's decision"),
        ("SetModelVersionTag", {"key": "test_auc", "value": "0.99"}, PENDING, "changing the tag test_auc"),
        ("SetModelVersionTag", {"key": "site.hospital-b", "value": "{}"}, SEALED, None),  # measurements, newest wins
        ("DeleteModelVersionTag", {"key": "approval"}, PENDING, "removing the tag approval"),
        ("DeleteModelVersionTag", {"key": "site.hospital-b"}, SEALED, None),
        ("UpdateModelVersion", {"description": "FORGED"}, SEALED, "rewriting the version's description"),
        ("UpdateModelVersion", {"description": "# card"}, mlflow_auth.Version(), None),  # the first card
        ("RenameRegisteredModel", {"name": "m", "new_name": "n"}, None, "renaming"),
        ("DeleteRegisteredModel", {"name": "m"}, None, "deleting the registered model"),
        ("DeleteModelVersion", {"name": "m", "version": "1"}, SEALED, "deleting a version"),
        ("TransitionModelVersionStage", {"name": "m", "version": "1", "stage": "Production"}, SEALED, "stage"),
        ("DeleteRegisteredModel", {"name": "m.promotion-lock"}, None, "deleting"),  # its creator manages it
        ("GetModelVersionByAlias", {"name": "m", "alias": "champion"}, None, None),  # reading is anyone's
    ],
)
def test_a_versions_record_is_the_reviewers(operation, message, version, needs):
    action = mlflow_auth.needs_manage(operation, message, version)
    assert (action is None) if needs is None else (needs in action), action


def test_a_rename_needs_manage_on_both_names():
    assert mlflow_auth.models_named("RenameRegisteredModel", {"name": "x.promotion-lock", "new_name": "m"}) == [
        "x.promotion-lock",
        "m",
    ]
    assert mlflow_auth.models_named("DeleteRegisteredModel", {"name": "m"}) == ["m"]


def test_the_protected_aliases_follow_the_environment(monkeypatch):
    monkeypatch.setenv("XRAY_MLFLOW_PROTECTED_ALIASES", "production, champion")
    assert (
        mlflow_auth.needs_manage("SetRegisteredModelAlias", {"alias": "production"}) == "moving the alias 'production'"
    )
    assert mlflow_auth.LOCK_SUFFIX == store.LOCK_SUFFIX  # a promotion lock stays its creator's to delete
    assert mlflow_auth.DIGEST_TAG == store.DIGEST_TAG and mlflow_auth.APPROVAL_TAG == store.APPROVAL_TAG


@pytest.mark.parametrize(
    "path, recursive, touched",
    [
        ("1/models/m-abc/artifacts/data/model.keras", False, True),
        ("7/models/m-abc/artifacts/data/model.keras", False, True),  # the id decides, not the experiment
        ("1/models/m-other/artifacts/data/model.keras", False, False),
        ("1/models/m-abc/artifacts", True, True),
        ("1/models", True, True),  # a delete of a folder above the version's
        ("1", True, True),
        ("1/models", False, False),
        ("1/0123456789abcdef0123456789abcdef/artifacts/plot.png", False, False),  # a run's own files
        ("1/0123456789abcdef0123456789abcdef/artifacts/model/MLmodel", False, True),  # a run-logged version (MLflow 2)
        ("1/0123456789abcdef0123456789abcdef", True, True),
    ],
)
def test_the_files_of_a_sealed_version_are_found_under_any_path_that_reaches_them(path, recursive, touched):
    run = "0123456789abcdef0123456789abcdef"
    folders = {
        mlflow_auth.folder_of("models:/m-abc", None): {"m"},
        mlflow_auth.folder_of(f"runs:/{run}/model", None, lambda r: f"mlflow-artifacts:/1/{r}/artifacts"): {"old"},
    }
    owners = mlflow_auth.artifact_owners(mlflow_auth.path_segments(path), recursive, folders)
    assert bool(owners) == touched
    assert mlflow_auth.folder_of("", "m-abc") == ("models", "m-abc")


@pytest.mark.parametrize("path", ["1/./models/m-abc/artifacts/x", "1//models/m-abc", "1/models/../models/m-abc", "/"])
def test_an_artifact_path_in_another_spelling_is_refused(path):
    with pytest.raises(mlflow_auth.Refused):
        mlflow_auth.path_segments(path)


def test_decision_tags_are_added_before_the_seal_and_a_promotion_is_never_an_edit():
    fresh = mlflow_auth.Version()
    assert mlflow_auth.tag_change("promotion_decision", "pending_approval", fresh) is None
    assert "reviewer's decision" in mlflow_auth.tag_change("promotion_decision", "promoted", fresh)
    champion_without_digest = mlflow_auth.Version(tags={"approval": "approved"}, aliases=["champion"])
    assert "sealed" in mlflow_auth.tag_change("model_sha256", "ab", champion_without_digest)  # none forged onto it
    assert "sealed" in mlflow_auth.tag_change("gate.test.images", "9", mlflow_auth.Version(aliases=["champion"]))
    assert mlflow_auth.tag_change("zenml.model_version_id", "x", SEALED) is None  # not a decision: added once
    created = {"tags": [{"key": "approval", "value": "approved"}]}
    assert "approval='approved'" in mlflow_auth.needs_manage("CreateModelVersion", created)
    forged = {"tags": [{"key": "history.1", "value": "{}"}]}
    assert "history.1" in mlflow_auth.needs_manage("CreateModelVersion", forged)


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
    """pipelines.decisions.decide with the decision itself recorded instead of made; ``signed_in`` is the server's
    account."""
    from pipelines import decisions as launch
    from xray.config.pipeline import PipelineConfig
    from xray.requests import DecisionRequest

    calls, signed_in = [], {"user": None}
    monkeypatch.setattr(launch.tracking, "authenticated_user", lambda uri: signed_in["user"])

    def approve(client, registry, version, who, why, approved_plans=frozenset()):  # the change plans approved so far
        calls.append(who)
        return {}

    monkeypatch.setattr(launch.decisions, "approve", approve)

    class Version:
        tags = {}

    monkeypatch.setattr(launch.MlflowClient, "get_model_version", lambda self, name, version: Version())
    config = PipelineConfig(registry=RegistryConfig(tracking_uri="http://127.0.0.1:1"))

    def decide(reviewer):
        request = DecisionRequest(config=config, action="approve", model_version="2", reviewer=reviewer, reason="ok")
        return launch.decide(request)

    return decide, calls, signed_in


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
    from pipelines import decisions as launch

    decide, _, signed_in = decided
    signed_in["user"] = "trainer"

    def refuse(client, registry, version, who, why, approved_plans=frozenset()):
        raise MlflowException(DENIED, error_code=PERMISSION_DENIED)

    monkeypatch.setattr(launch.decisions, "approve", refuse)
    with pytest.raises(ConfigError) as raised:
        decide(None)
    assert str(raised.value).startswith("MLflow refused the approve by account 'trainer': Permission denied: moving")


def test_a_registry_config_without_approval_keeps_promoting_by_itself():
    assert RegistryConfig().require_approval is False  # today's automatic promotion, unless a stack needs a person
