"""The change plan applied to a candidate: what a version is (:func:`version_record`: the config keys that make the
model, the domain code's version, the label set, the preprocessing and the data it was trained on), how it differs
from the champion's record (:func:`classify`, each difference matched to the plan), whether the plan is in force
(:func:`in_force`) and the decision (:func:`decide`): outside the plan refused, naming each change; inside it the
plan's criteria are the gate (its margins per set, its sensitivity floor, its ECE bound per site).

Pure: the records come in (the champion's from its version tag :data:`RECORD_TAG`, the approved plans from the audit
trail) and a :class:`xray.registry.gate.PromotionDecision` goes out."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from xray import CLASS_NAMES
from xray.config.base import flatten
from xray.config.change_plan import Allowed, ChangePlanConfig, category_of
from xray.config.pipeline import PipelineConfig
from xray.registry import gate

RECORD_TAG = "change_control"
"""The version tag that holds its record (JSON): what the next candidate is compared with."""
NOT_THE_MODEL = (
    "train.backup_dir",
    "train.mixed_precision",
    "train.jit_compile",
    "train.run_eagerly",
    "train.distribution",
    "data.limits.",
)
"""Keys of the model's sections that say how a run executes, not what it learns: never a difference."""
MODEL_KEYS = ("seed", "model.", "train.", "data.", "scope.")
OPERATING_POINT = (
    "evaluate.calibration",
    "evaluate.threshold_policy",
    "evaluate.min_sensitivity",
    "evaluate.fixed_threshold",
)


def plan_digest(plan: ChangePlanConfig) -> str:
    """SHA-256 of the plan as its canonical JSON: the plan version the trail's approval names."""
    text = json.dumps(plan.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def version_record(config: PipelineConfig, code_version: str, training_data: dict, preprocessing: str) -> dict:
    """What a version is, for the next comparison: the config keys that make the model (``data.sources`` as the
    sites' content digests), the domain code's version, the label set, the preprocessing, and the plan it was
    registered under. JSON-able; no path, URI or image of a patient."""
    flat = flatten(config.model_dump(mode="json", include={"seed", "model", "train", "data", "scope", "evaluate"}))
    keys = {
        key: value
        for key, value in flat.items()
        if (key.startswith(MODEL_KEYS) or key in OPERATING_POINT)
        and key != "data.sources"
        and not key.startswith(NOT_THE_MODEL)
    }
    keys |= {"classes": list(CLASS_NAMES), "preprocessing": preprocessing}
    plan = config.change_plan
    return {
        "plan_version": plan.version if plan else None,
        "plan_digest": plan_digest(plan) if plan else None,
        "config": keys,
        "code_version": code_version,
        "sites": dict(sorted((training_data.get("sites") or {}).items())),
    }


@dataclass
class Change:
    """One difference between the candidate and the champion, matched to the plan."""

    what: str
    before: object
    after: object
    modification: str | None  # the plan's category of the key; None: a key no category covers
    in_plan: bool
    why: str

    def describe(self) -> str:
        return f"{self.what} {_text(self.before)} -> {_text(self.after)} ({self.modification}: {self.why})"


@dataclass
class Classification:
    """The candidate's differences from the champion's record; ``first``: no champion to differ from."""

    plan_version: int
    plan_digest: str
    champion: str | None
    changes: list[Change] = field(default_factory=list)
    first: bool = False
    note: str = ""

    @property
    def in_plan(self) -> bool:
        return all(change.in_plan for change in self.changes)

    @property
    def outside(self) -> list[Change]:
        return [change for change in self.changes if not change.in_plan]


def _text(value) -> str:
    return "(none)" if value is None else str(value)[:120]


def _within(allowed: Allowed, value) -> bool:
    if allowed.choices is not None:
        return value in allowed.choices
    if allowed.low is None or allowed.high is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return allowed.low <= value <= allowed.high


def _bounds(allowed: Allowed) -> str:
    return f"one of {list(allowed.choices)}" if allowed.choices is not None else f"[{allowed.low:g}, {allowed.high:g}]"


def match(plan: ChangePlanConfig, key: str, before, after) -> Change:
    """One config key's difference, matched to the plan: a fixed modification the plan forbids, a recalibration, an
    operating point within its bounds, a hyperparameter within its range, or not in the plan at all."""
    category = category_of(key)
    if category in plan.not_allowed:
        return Change(key, before, after, category, False, "the plan does not allow it")
    if key == "evaluate.calibration":
        allowed = after in plan.recalibration
        return Change(key, before, after, "recalibration", allowed, f"methods allowed: {list(plan.recalibration)}")
    ranges = plan.operating_point if key in OPERATING_POINT else plan.hyperparameters
    kind = "operating point" if key in OPERATING_POINT else "hyperparameter"
    if key in ranges:
        inside = _within(ranges[key], after)
        return Change(key, before, after, kind, inside, f"{'within' if inside else 'outside'} {_bounds(ranges[key])}")
    return Change(key, before, after, kind if category is None else category, False, "not in the change plan")


def classify(plan: ChangePlanConfig, candidate: dict, champion: dict | None, champion_version: str | None):
    """The candidate's record against the champion's: every config key that differs, the code version, each site's
    data (new data from a listed site is a retraining the plan allows), each matched to the plan. No champion: the
    first version, nothing to differ from. A champion without a record (registered before change control): every
    key the candidate has is compared with nothing and listed as not recorded, outside the plan."""
    digest = plan_digest(plan)
    result = Classification(plan.version, digest, champion_version)
    if champion_version is None:
        result.first, result.note = True, "no champion: the first version under the plan"
        return result
    if not champion:
        result.changes.append(
            Change("champion record", None, "recorded", "baseline", False, "the champion predates change control")
        )
        result.note = f"champion v{champion_version} has no {RECORD_TAG} record: nothing to compare with"
        return result
    before, after = champion.get("config", {}), candidate["config"]
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            result.changes.append(match(plan, key, before.get(key), after.get(key)))
    if champion.get("code_version") != candidate["code_version"]:
        result.changes.append(
            Change(
                "code version",
                (champion.get("code_version") or "")[:12] or None,
                candidate["code_version"][:12],
                "code",
                plan.code_changes,
                "code_changes: " + ("allowed" if plan.code_changes else "not allowed"),
            )
        )
    old, new = champion.get("sites", {}), candidate["sites"]
    for site in sorted(set(old) | set(new)):
        if old.get(site) == new.get(site):
            continue
        listed = site in plan.sites
        what = "new data" if site in old and site in new else "a new site" if site in new else "site withdrawn"
        result.changes.append(
            Change(
                f"data from site {site}",
                (old.get(site) or "")[:12] or None,
                (new.get(site) or "")[:12] or None,
                f"retraining on {what}",
                listed,
                f"{'a' if listed else 'not a'} site the plan lists ({', '.join(plan.sites) or 'none'})",
            )
        )
    return result


def in_force(plan: ChangePlanConfig, champion: dict | None, approved: set[str]) -> str | None:
    """None when the plan may decide: the champion's own plan, one a reviewer approved (``approved``: the digests
    the audit trail's plan approvals name), or the first version's; else why not."""
    digest = plan_digest(plan)
    if champion is None or champion.get("plan_digest") in (None, digest) or digest in approved:
        return None
    return (
        f"change plan v{plan.version} ({digest[:12]}) differs from champion's plan v{champion.get('plan_version')} "
        "and no reviewer has approved it: python3 run.py audit approve-plan --reason TEXT (the reviewer account)"
    )


def margins(plan: ChangePlanConfig, names) -> dict[str, float]:
    """Each gate set's margin under the plan: ``test`` the overall one, a site's share of test or a gate site the
    site margin, a DICOM subgroup the subgroup margin."""
    criteria = plan.criteria

    def margin(name: str) -> float:
        if name.startswith("subgroup:"):
            return criteria.subgroup_margin
        if name.startswith(("test:", "site:")):
            return criteria.site_margin
        return criteria.margin

    return {name: margin(name) for name in names}


def site_ece(evaluation_report: dict) -> dict[str, float | None]:
    """Each training site's test ECE with its own calibration: at its own operating point (fitted on its own val),
    or, for the only site, at the version's (fitted on that site's val); None where it has none."""
    sites = evaluation_report.get("sites") or {}
    found = {}
    for site, entry in sites.items():
        own = entry.get("test_at_operating_point") if entry.get("operating_point") else None
        if own is None and len(sites) == 1:
            own = entry.get("test")
        found[site] = float(own["ece"]) if own and own.get("ece") is not None else None
    return found


def decide(classification: Classification, plan: ChangePlanConfig, scores: gate.Scores, rule: dict):
    """The decision under the plan. ``rule``: ``test_sensitivity``, ``site_ece`` (:func:`site_ece`), ``samples``,
    ``seed``. Outside the plan: refused as "outside the change plan", naming each change; inside: the plan's criteria are the
    gate (:func:`xray.registry.gate.decide_on` with the plan's floor and margins), then the ECE bound per site."""
    criteria = plan.criteria
    record = {
        "plan_version": plan.version,
        "plan_digest": classification.plan_digest,
        "in_plan": classification.in_plan,
        "first": classification.first,
        "note": classification.note,
        "changes": [asdict(change) for change in classification.changes],
        "criteria": criteria.model_dump(mode="json"),
        "test_sensitivity": rule["test_sensitivity"],
        "ece": {
            site: {"ece": ece, "bound": criteria.max_ece, "passed": None if ece is None else ece <= criteria.max_ece}
            for site, ece in rule["site_ece"].items()
        },
    }
    if not classification.in_plan:
        why = "outside the change plan v{}: {}".format(
            plan.version, "; ".join(change.describe() for change in classification.outside)
        )
        return gate.PromotionDecision(
            False, why, scores.champion, margin=criteria.margin, champion_error=None, change_control=record
        )
    sets = margins(plan, scores.champion_probabilities or scores.labels)
    decision = gate.decide_on(
        scores, rule["test_sensitivity"], criteria.min_sensitivity, criteria.margin, rule["samples"], rule["seed"], sets
    )
    changes = "; ".join(change.describe() for change in classification.changes) or classification.note or "no change"
    decision = replace(
        decision, change_control=record, reason=f"in the change plan v{plan.version} ({changes}); {decision.reason}"
    )
    over = {site: v["ece"] for site, v in record["ece"].items() if v["passed"] is False}
    if over:
        sites = ", ".join(f"site {site} ECE {ece:.4f}" for site, ece in over.items())
        reason = f"beyond the change plan's ECE bound {criteria.max_ece:g} on {sites}"
        decision = replace(decision, promoted=False, reason=f"{reason}; {decision.reason}")
    return decision


def judge(config: PipelineConfig, scores: gate.Scores, champion: dict | None, candidate: dict, evaluation) -> object:
    """The gate under ``config.change_plan``: :func:`classify` the candidate's record against the champion's,
    :func:`decide` by the plan's criteria; ``evaluation``: (test sensitivity, the evaluation's report, the approved
    plan digests, bootstrap samples). A plan a reviewer has not approved (:func:`in_force`) promotes nothing by
    itself: a version that passes under it waits as a candidate for the reviewer (approve checks the approval)."""
    plan = config.change_plan
    assert plan is not None  # judge is called only under a change plan
    test_sensitivity, report, approved, samples = evaluation
    classification = classify(plan, candidate, champion, scores.champion)
    rule = {"test_sensitivity": test_sensitivity, "site_ece": site_ece(report), "samples": samples, "seed": config.seed}
    decision = decide(classification, plan, scores, rule)
    decision.change_control["record"] = candidate
    waiting = in_force(plan, champion if scores.champion else None, approved)
    decision.change_control["plan_approval_needed"] = waiting
    if waiting and decision.promoted:
        return replace(decision, promoted=False, pending_approval=True, reason=f"{waiting}; {decision.reason}")
    return decision
