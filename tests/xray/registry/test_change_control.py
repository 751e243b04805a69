"""Change control (issue #45), on synthetic records and scores: the change plan of the shipped configs, each
candidate classified against the champion and decided by the plan's criteria (the acceptance's smoke-config
scenarios), the plan's own approval, the impact report, and the audit trail's chain under every kind of tampering."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from xray.config.change_plan import ChangePlanConfig
from xray.config_file import load_config
from xray.registry import gate
from xray.registry.control import audit, impact, plan

ROOT = Path(__file__).resolve().parents[3]
SMOKE = load_config(ROOT / "configs" / "training_smoke.yaml")
DEFAULT = load_config(ROOT / "configs" / "training_local.yaml")
CODE = "c0de" * 16


def record(config=SMOKE, code=CODE, sites=None, preprocessing="fixed scaling"):
    return plan.version_record(config, code, {"sites": sites or {"guangzhou": "aa" * 32}}, preprocessing)


def scores(worse: dict | None = None, n: int = 200, seed: int = 0) -> gate.Scores:
    """Paired scores on the whole test split, a site's share and a subgroup: the challenger as good as the champion,
    except on the sets in ``worse`` (name -> how much noise its probabilities get)."""
    rng = np.random.default_rng(seed)
    labels, challenger, champion = {}, {}, {}
    for name in ("test", "test:guangzhou", "subgroup:PatientSex=F"):
        y = rng.integers(0, 2, n)
        good = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.15, n), 0, 1)
        noisy = np.clip(good + rng.normal(0, (worse or {}).get(name, 0.0), n), 0, 1)
        labels[name], challenger[name], champion[name] = y.tolist(), noisy.tolist(), good.tolist()
    return replace(gate.Scores.of("1", labels, challenger), champion_probabilities=champion)


def report(ece: float = 0.05) -> dict:
    return {"sites": {"guangzhou": {"operating_point": None, "test": {"ece": ece}}}}


def judge(candidate, champion=None, worse=None, approved=frozenset(), config=SMOKE, ece=0.05, first=False):
    s = gate.Scores.of(None, {}, {}) if first else scores(worse)
    return plan.judge(config, s, champion, candidate, (1.0, report(ece), set(approved), 200))


def test_the_smoke_and_default_configs_carry_a_plan_and_the_default_is_the_user_guides():
    for config in (SMOKE, DEFAULT):
        assert config.change_plan is not None and config.change_plan.version == 1
        assert set(config.change_plan.not_allowed) == {
            "backbone",
            "input size",
            "normalization",
            "scope",
            "label set",
            "preprocessing",
        }
    guide = (ROOT / "docs" / "USER_GUIDE.md").read_text()
    text = (ROOT / "configs" / "training_local.yaml").read_text()
    shown = text[text.index("change_plan:") : text.index("inference:")].strip()
    indented = "\n".join(f"  {line}" if line else line for line in shown.splitlines())  # inside a list item
    assert f"```yaml\n{indented}\n  ```" in guide, "docs/USER_GUIDE.md shows the default config's change_plan as it is"


def test_a_plan_refuses_a_range_without_both_ends_and_a_hyperparameter_it_forbids():
    with pytest.raises(ValidationError, match="either low and high, or choices"):
        ChangePlanConfig(hyperparameters={"train.epochs": {"low": 1}})
    with pytest.raises(ValidationError, match="low 5 > high 1"):
        ChangePlanConfig(hyperparameters={"train.epochs": {"low": 5, "high": 1}})
    with pytest.raises(ValidationError, match="model.image_size is a input size change"):
        ChangePlanConfig(hyperparameters={"model.image_size": {"choices": [64, 128]}})
    with pytest.raises(ValidationError, match="not an operating point key"):
        ChangePlanConfig(operating_point={"train.epochs": {"low": 1, "high": 2}})
    # With input size no longer forbidden, a plan may allow image sizes.
    allowed = ChangePlanConfig(not_allowed=["backbone"], hyperparameters={"model.image_size": {"choices": [64, 128]}})
    assert plan.match(allowed, "model.image_size", 64, 128).in_plan


def test_a_retrain_on_new_data_from_a_listed_site_is_in_plan_and_decided_by_the_plans_criteria():
    champion = record()
    candidate = record(sites={"guangzhou": "bb" * 32})  # new images at the listed site
    decision = judge(candidate, champion)
    (change,) = decision.change_control["changes"]
    assert change["what"] == "data from site guangzhou" and change["in_plan"]
    assert change["modification"] == "retraining on new data"
    assert decision.promoted and decision.reason.startswith("in the change plan v1 (data from site guangzhou")
    # The plan's margins are the gate's: overall, per site share, per subgroup.
    criteria = SMOKE.change_plan.criteria
    assert decision.margin == criteria.margin
    assert decision.margins == {
        "test": criteria.margin,
        "test:guangzhou": criteria.site_margin,
        "subgroup:PatientSex=F": criteria.subgroup_margin,
    }
    tags = gate.tags(decision)
    assert tags["gate.subgroup:PatientSex=F.margin"] == criteria.subgroup_margin
    # The plan's floor, not the evaluation's: a sensitivity below it refuses.
    low = plan.judge(SMOKE, scores(), champion, candidate, (0.9, report(), set(), 200))
    assert not low.promoted and "test_sensitivity 0.9000 < min_sensitivity 0.95" in low.reason


def test_a_change_of_image_size_is_refused_as_outside_the_plan_naming_the_change():
    config = SMOKE.model_copy(update={"model": SMOKE.model.model_copy(update={"image_size": 128})})
    decision = judge(record(config), record())
    assert not decision.promoted and decision.comparisons == {}
    assert decision.reason.startswith("outside the change plan v1: model.image_size 64 -> 128 (input size")
    assert decision.change_control["in_plan"] is False


def test_a_candidate_whose_subgroup_falls_beyond_its_margin_is_refused_naming_the_subgroup():
    decision = judge(record(sites={"guangzhou": "bb" * 32}), record(), worse={"subgroup:PatientSex=F": 0.6})
    assert not decision.promoted
    assert "beyond its margin on subgroup:PatientSex=F (margin 0.02): AUC" in decision.reason
    assert "test:guangzhou" not in decision.reason.split("beyond")[1]  # only the failing set is named


@pytest.mark.parametrize(
    "change, what, modification",
    [
        (
            lambda c: c.model_copy(update={"model": c.model.model_copy(update={"backbone": "mobilenetv3large"})}),
            "model.backbone",
            "backbone",
        ),
        (
            lambda c: c.model_copy(update={"scope": c.scope.model_copy(update={"age_years": (1, 9)})}),
            "scope.age_years",
            "scope",
        ),
        (
            lambda c: c.model_copy(update={"train": c.train.model_copy(update={"epochs": 50})}),
            "train.epochs",
            "hyperparameter",
        ),
        (
            lambda c: c.model_copy(update={"model": c.model.model_copy(update={"dropout": 0.1})}),
            "model.dropout",
            "hyperparameter",
        ),
        (
            lambda c: c.model_copy(update={"evaluate": c.evaluate.model_copy(update={"min_sensitivity": 0.5})}),
            "evaluate.min_sensitivity",
            "operating point",
        ),
    ],
)
def test_each_other_change_is_matched_to_the_plan_and_refused_when_it_is_not_allowed(change, what, modification):
    decision = judge(record(change(SMOKE)), record())
    (found,) = decision.change_control["changes"]
    assert found["what"] == what and found["modification"] == modification and not found["in_plan"]
    assert not decision.promoted and f"outside the change plan v1: {what} " in decision.reason


def test_changes_within_the_plan_are_listed_and_pass():
    config = SMOKE.model_copy(
        update={
            "train": SMOKE.train.model_copy(update={"epochs": 3}),
            "evaluate": SMOKE.evaluate.model_copy(update={"calibration": "platt", "min_sensitivity": 0.97}),
            "registry": SMOKE.registry.model_copy(update={"margin": 0.3}),  # not the model: never a difference
        }
    )
    decision = judge(record(config, code="f" * 64), record())
    listed = {c["what"]: c for c in decision.change_control["changes"]}
    assert set(listed) == {"train.epochs", "evaluate.calibration", "evaluate.min_sensitivity", "code version"}
    assert all(c["in_plan"] for c in listed.values()) and decision.promoted
    assert listed["evaluate.calibration"]["modification"] == "recalibration"


def test_an_unlisted_site_a_forbidden_code_change_and_an_unrecorded_champion_are_outside():
    decision = judge(record(sites={"guangzhou": "aa" * 32, "b": "bb" * 32}), record())
    assert (
        "data from site b (none) -> bbbbbbbbbbbb (retraining on a new site: not a site the plan lists"
        in decision.reason
    )
    strict = SMOKE.model_copy(update={"change_plan": SMOKE.change_plan.model_copy(update={"code_changes": False})})
    decision = judge(record(strict, code="f" * 64), record(strict), config=strict)
    assert not decision.promoted and "code version" in decision.reason
    decision = judge(record(), None)  # a champion registered before change control
    assert not decision.promoted and "the champion predates change control" in decision.reason


def test_the_first_version_is_judged_on_its_own_and_the_ece_bound_applies_per_site():
    first = judge(record(), None, first=True)
    assert first.promoted and first.change_control["first"] and "no champion yet" in first.reason
    over = judge(record(), None, first=True, ece=0.7)
    assert not over.promoted and "beyond the change plan's ECE bound 0.5 on site guangzhou ECE 0.7000" in over.reason
    assert plan.site_ece(
        {"sites": {"a": {"operating_point": None, "test": {"ece": 0.2}}, "b": {"operating_point": {}}}}
    ) == {"a": None, "b": None}


def test_a_new_plan_version_promotes_nothing_until_the_reviewer_approves_it():
    wider = SMOKE.change_plan.model_copy(update={"version": 2, "sites": ("guangzhou", "b")})
    config = SMOKE.model_copy(update={"change_plan": wider})
    candidate = record(config, sites={"guangzhou": "aa" * 32, "b": "bb" * 32})
    waiting = judge(candidate, record(), config=config)
    assert waiting.change_control["in_plan"] and not waiting.promoted and waiting.pending_approval
    assert waiting.reason.startswith("change plan v2") and "audit approve-plan" in waiting.reason
    approved = judge(candidate, record(), config=config, approved={plan.plan_digest(wider)})
    assert approved.promoted and not approved.pending_approval


def test_the_impact_report_says_what_changed_the_criteria_with_intervals_and_who_decided():
    decision = judge(record(sites={"guangzhou": "bb" * 32}), record(), worse={"subgroup:PatientSex=F": 0.6})
    found = impact.report(decision, "m", "7", "the promotion gate, run as trainer", "run1")
    assert found["decision"] == "not promoted" and found["decided_by"] == "the promotion gate, run as trainer"
    results = {r["criterion"]: r for r in found["results"]}
    subgroup = results["non-inferior AUC on subgroup:PatientSex=F"]
    assert subgroup["margin"] == 0.02 and not subgroup["passed"] and subgroup["ci95"][0] < -0.02
    assert results["ECE on site guangzhou at its own operating point"]["passed"]
    text = impact.markdown(found)
    assert "| data from site guangzhou |" in text and "| non-inferior AUC on subgroup:PatientSex=F |" in text
    assert "**not promoted**, by the promotion gate, run as trainer" in text
    assert json.loads(json.dumps(found)) == found  # JSON as logged
    outside = judge(
        record(SMOKE.model_copy(update={"model": SMOKE.model.model_copy(update={"image_size": 128})})), record()
    )
    section = impact.card_section(impact.report(outside, "m", "", "gate", "r"), "runs:/r/impact/impact_report.md")
    assert "outside the plan: model.image_size" in section and "`runs:/r/impact/impact_report.md`" in section


# The audit trail.


@pytest.fixture
def trail(tmp_path):
    t = audit.Trail(audit.FolderFiles(tmp_path / "audit"))
    for index, what in enumerate(("plan version", "gate decision", "registration", "approval", "rollback")):
        t.append(
            what, "reviewer" if what in ("approval", "rollback") else "trainer", f"why {index}", {"model_version": "1"}
        )
    return t


def _path(t, seq):
    return t.files.root / audit.record_name(seq)


def test_an_intact_trail_verifies_and_each_record_carries_the_hash_before_it(trail):
    checked = trail.verify()
    assert checked.ok and checked.records == 5
    records = trail.records()
    assert records[0]["previous"] == audit.GENESIS
    assert all(b["previous"] == a["hash"] for a, b in zip(records, records[1:]))
    assert {"seq", "at", "who", "what", "why", "details", "previous", "hash", "file"} <= set(records[3])
    assert records[3]["who"] == "reviewer" and records[3]["at"].endswith("Z")


def test_editing_a_record_names_it(trail):
    path = _path(trail, 3)
    path.write_text(path.read_text().replace('"why 2"', '"why changed"'))
    checked = trail.verify()
    assert not checked.ok and checked.broken == "record 3" and "does not match its hash (edited)" in checked.why


def test_an_edit_that_rehashes_the_record_breaks_the_next_link(trail):
    path = _path(trail, 2)
    edited = json.loads(path.read_text()) | {"who": "someone else"}
    edited["hash"] = audit.record_hash(edited)
    path.write_bytes(audit.canonical(edited))
    checked = trail.verify()
    assert checked.broken == "record 3" and "is not record 2's" in checked.why


@pytest.mark.parametrize("seq, named", [(2, "record 2"), (5, "record 5"), (1, "record 1")])
def test_deleting_a_record_names_it(trail, seq, named):
    _path(trail, seq).unlink()
    checked = trail.verify()
    assert not checked.ok and checked.broken == named and "deleted" in checked.why


def test_reordering_records_names_the_first_out_of_place(trail):
    two, four = _path(trail, 2).read_bytes(), _path(trail, 4).read_bytes()
    _path(trail, 2).write_bytes(four)
    _path(trail, 4).write_bytes(two)
    checked = trail.verify()
    assert checked.broken == "record 2" and "holds record 4 (reordered)" in checked.why
    # Renumbered and re-hashed to fit their new places: the chain of previous hashes still breaks.
    for seq, data in ((2, four), (4, two)):
        moved = json.loads(data) | {"seq": seq}
        moved["hash"] = audit.record_hash(moved)
        _path(trail, seq).write_bytes(audit.canonical(moved))
    assert trail.verify().broken == "record 2"


def test_appending_refuses_an_unknown_kind_no_reason_and_what_is_not_json(tmp_path):
    t = audit.Trail(audit.FolderFiles(tmp_path))
    with pytest.raises(ValueError, match="not one of"):
        t.append("coffee", "a", "b")
    with pytest.raises(ValueError, match="needs who and why"):
        t.append("approval", "a", " ")
    with pytest.raises(ValueError):
        t.append("approval", "a", "b", {"x": float("nan")})
    assert t.verify().ok and t.verify().records == 0
    record = audit.append(t, "node start", "node-1", "started", {"model_version": "3", "runtime": "onnx"})
    assert record["seq"] == 1 and t.verify().ok
    assert t.approved_plans() == set()


def test_audit_verify_and_show_on_the_command_line(tmp_path, monkeypatch):
    """`run.py audit verify | show [--json] | approve-plan` on a trail in a folder (the stack's artifact store is
    replaced by it): exit 0 when intact, 5 naming the record when not; the listing names the files."""
    from click.testing import CliRunner

    from cli import output
    from cli.app import main
    from cli.common import AUDIT_BROKEN_EXIT_CODE
    from pipelines import audit as audit_job
    from pipelines import launch

    t = audit.Trail(audit.FolderFiles(tmp_path / "audit"))
    monkeypatch.setattr(audit_job, "audit_trail", lambda: t)
    monkeypatch.setattr(launch, "on_stack", lambda config, name: config)
    monkeypatch.setattr(output, "import_tensorflow_quietly", lambda: None)
    smoke = str(ROOT / "configs" / "training_smoke.yaml")

    def run(*args):
        return CliRunner().invoke(main, ["audit", *args, "--config", smoke])

    approved = run("approve-plan", "--reviewer", "Dr. R", "--reason", "as agreed")
    assert approved.exit_code == 0, approved.output
    assert json.loads(approved.stdout.splitlines()[-1])["who"] == "Dr. R"
    assert t.approved_plans() == {plan.plan_digest(SMOKE.change_plan)}
    assert [r["what"] for r in t.records()] == ["plan version", "plan approval"]
    assert run("approve-plan", "--reviewer", "Dr. R", "--reason", "again").exit_code == 2  # already approved
    t.append("registration", "trainer", "registered", {"model_version": "1"})
    verified = run("verify")
    assert (
        verified.exit_code == 0
        and json.loads(verified.stdout)["intact"]
        and json.loads(verified.stdout)["records"] == 3
    )
    shown = json.loads(run("show", "--json").stdout)
    assert [r["what"] for r in shown["records"]] == ["plan version", "plan approval", "registration"]
    assert shown["files"] == [(tmp_path / "audit" / audit.record_name(i)).resolve().as_uri() for i in (1, 2, 3)]
    listing = run("show").stdout.splitlines()
    assert len(listing) == 4 and listing[1].split("\t")[:5][3:] == ["plan approval", "as agreed"]
    path = tmp_path / "audit" / audit.record_name(2)
    path.write_text(path.read_text().replace("as agreed", "as never agreed"))
    broken = run("verify")
    assert broken.exit_code == AUDIT_BROKEN_EXIT_CODE == 5
    summary = json.loads(broken.stdout)
    assert summary["broken"] == "record 2" and not summary["intact"] and "edited" in summary["why"]
    refused = run("approve-plan", "--reviewer", "Dr. R", "--reason", "x")
    assert refused.exit_code == 2 and "the audit trail is broken at record 2" in refused.output


def test_on_a_server_with_accounts_only_the_reviewer_account_approves_a_plan(monkeypatch):
    """pipelines.audit.reviewer_account with the server's answer replaced: the signed-in account is who approves; an
    account without MANAGE on the model (the trainer) is refused, and so is a --reviewer naming someone else."""
    from pipelines import audit as audit_job
    from xray.errors import ConfigError
    from xray.requests import AuditRequest

    def request(reviewer=None):
        return AuditRequest(config=SMOKE, action="approve-plan", reason="agreed", reviewer=reviewer)

    monkeypatch.setattr(audit_job.tracking, "may_promote", lambda uri, model: ("reviewer", True))
    assert audit_job.reviewer_account(request()) == "reviewer"
    with pytest.raises(ConfigError, match="--reviewer Dr. X is not the MLflow account signed in"):
        audit_job.reviewer_account(request("Dr. X"))
    monkeypatch.setattr(audit_job.tracking, "may_promote", lambda uri, model: ("trainer", False))
    with pytest.raises(ConfigError, match="'trainer' is not a reviewer .* approved by the reviewer account"):
        audit_job.reviewer_account(request())
    monkeypatch.setattr(audit_job.tracking, "may_promote", lambda uri, model: None)
    with pytest.raises(ConfigError, match="needs --reviewer NAME"):
        audit_job.reviewer_account(request())
    assert audit_job.reviewer_account(request("Dr. R")) == "Dr. R"


def test_each_decision_is_a_record_and_a_refused_one_none(tmp_path, monkeypatch):
    """pipelines.decisions.decide with the registry's decisions replaced: approve, reject and rollback each append
    their record (who, why, the version); a decision MLflow refuses appends nothing; approve is handed the plans the
    trail's approvals name."""
    from pipelines import decisions as decisions_job
    from xray.errors import ConfigError
    from xray.requests import DecisionRequest

    t = audit.Trail(audit.FolderFiles(tmp_path))
    t.append("plan approval", "Dr. R", "agreed", {"plan_digest": "d1"})
    handed = {}

    class Version:
        tags = {}

    class Client:
        def __init__(self, tracking_uri=None):
            pass

        def get_model_version(self, name, version):
            return Version()

    def approve(client, registry, version, reviewer, reason, approved_plans):
        handed["plans"] = approved_plans
        return {"action": "approved", "previous_champion": "1"}

    def refuse(*args):
        raise ConfigError("v3 is not pending approval")

    monkeypatch.setattr(decisions_job, "audit_trail", lambda: t)
    monkeypatch.setattr(decisions_job, "MlflowClient", Client)
    monkeypatch.setattr(decisions_job.tracking, "authenticated_user", lambda uri: None)
    monkeypatch.setattr(decisions_job.decisions, "approve", approve)
    monkeypatch.setattr(
        decisions_job.decisions, "rollback", lambda *a: {"action": "rolled back", "previous_champion": "2"}
    )
    monkeypatch.setattr(decisions_job.decisions, "reject", refuse)

    def decide(action, version, reason):
        return decisions_job.decide(
            DecisionRequest(config=SMOKE, action=action, model_version=version, reviewer="Dr. R", reason=reason)
        )

    decide("approve", "2", "read 40 studies")
    decide("rollback", "1", "alarms")
    with pytest.raises(ConfigError):
        decide("reject", "3", "no")
    assert handed["plans"] == {"d1"}
    records = t.records()
    assert [(r["what"], r["who"], r["why"]) for r in records[1:]] == [
        ("approval", "Dr. R", "read 40 studies"),
        ("rollback", "Dr. R", "alarms"),
    ]
    assert records[1]["details"] == {
        "model_name": SMOKE.registry.model_name,
        "model_version": "2",
        "previous_champion": "1",
    }
    assert t.verify().ok
