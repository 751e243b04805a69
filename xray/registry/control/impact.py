"""The impact report of a candidate (JSON and markdown, logged in its MLflow run, linked from its model card): what
changed against the champion and how the change plan classed each change, the plan's criteria and their results with
intervals (the whole test split, per site, per subgroup, the sensitivity floor, the ECE bound per site), and the
decision with who made it."""

from __future__ import annotations

from xray.registry import gate

FOLDER = "impact"
JSON_FILE = "impact_report.json"
MARKDOWN_FILE = "impact_report.md"


def report(decision: gate.PromotionDecision, model_name: str, version: str, who: str, run_id: str) -> dict:
    """The report of ``decision`` (its ``change_control`` from :func:`xray.registry.control.plan.decide`)."""
    control = decision.change_control
    criteria = control.get("criteria", {})
    results = []
    for name, c in decision.comparisons.items():
        margin = decision.margins.get(name, decision.margin or 0.0)
        results.append(
            {
                "criterion": f"non-inferior AUC on {name}",
                "image_set": name,
                "images": c["images"],
                "auc": c["auc_challenger"],
                "auc_champion": c["auc_champion"],
                "difference": c["auc_difference"],
                "ci95": [c["auc_difference_ci_low"], c["auc_difference_ci_high"]],
                "margin": margin,
                "passed": c["auc_difference_ci_low"] >= -margin,
            }
        )
    if "test_sensitivity" in control:
        floor = criteria.get("min_sensitivity")
        results.append(
            {
                "criterion": "test sensitivity at the val-chosen threshold",
                "value": control["test_sensitivity"],
                "bound": floor,
                "passed": floor is not None and control["test_sensitivity"] >= floor,
            }
        )
    for site, entry in control.get("ece", {}).items():
        results.append(
            {
                "criterion": f"ECE on site {site} at its own operating point",
                "value": entry["ece"],
                "bound": entry["bound"],
                "passed": entry["passed"],
            }
        )
    decided = (
        "promoted"
        if decision.promoted
        else "pending approval"
        if decision.pending_approval
        else "refused outside the change plan"
        if control and not control.get("in_plan", True)
        else "not promoted"
    )
    return {
        "model_name": model_name,
        "model_version": version,
        "mlflow_run_id": run_id,
        "champion": decision.previous_champion,
        "plan_version": control.get("plan_version"),
        "plan_digest": control.get("plan_digest"),
        "in_plan": control.get("in_plan"),
        "note": control.get("note", ""),
        "changes": control.get("changes", []),
        "criteria": criteria,
        "results": results,
        "decision": decided,
        "reason": decision.reason,
        "decided_by": who,
    }


def _value(value) -> str:
    if value is None:
        return "not measured"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _cell(value) -> str:
    return " ".join(str(value).split()).replace("|", "/")[:120]


def markdown(impact: dict) -> str:
    """The report as a reviewer reads it."""
    plan = (
        f"change plan v{impact['plan_version']} (`{(impact['plan_digest'] or '')[:12]}`)"
        if impact["plan_version"]
        else "no change plan"
    )
    lines = [
        f"# Impact report: {impact['model_name']} v{impact['model_version']}",
        "",
        f"Candidate of MLflow run `{impact['mlflow_run_id']}` against champion "
        f"{'v' + impact['champion'] if impact['champion'] else '(none)'}, under the {plan}.",
        "",
        "## What changed",
    ]
    if impact["changes"]:
        lines += [
            "",
            "| change | champion | candidate | modification | in the plan | why |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for change in impact["changes"]:
            lines.append(
                f"| {_cell(change['what'])} | {_cell(change['before'])} | {_cell(change['after'])} | "
                f"{_cell(change['modification'])} | {'yes' if change['in_plan'] else '**no**'} | {_cell(change['why'])} |"
            )
    else:
        lines.append(impact["note"] or "Nothing: the candidate's record equals the champion's.")
    lines += ["", "## Criteria and results", ""]
    if impact["results"]:
        lines += ["| criterion | result | 95% CI | bound | passed |", "| --- | --- | --- | --- | --- |"]
        for r in impact["results"]:
            if "ci95" in r:
                result = f"AUC {r['auc']:.4f} vs {r['auc_champion']:.4f}, difference {r['difference']:+.4f} ({r['images']} images)"
                interval, bound = f"{r['ci95'][0]:+.4f} to {r['ci95'][1]:+.4f}", f">= -{r['margin']:g}"
            else:
                result, interval = _value(r["value"]), ""
                bound = f">= {r['bound']:g}" if "sensitivity" in r["criterion"] else f"<= {r['bound']:g}"
            passed = "n/a" if r["passed"] is None else "yes" if r["passed"] else "**no**"
            lines.append(f"| {_cell(r['criterion'])} | {result} | {interval} | {bound} | {passed} |")
    else:
        lines.append("None measured (refused before the gate, or no champion to compare with).")
    lines += [
        "",
        "## Decision",
        "",
        f"**{impact['decision']}**, by {impact['decided_by']}: {impact['reason']}",
        "",
        "Later decisions (approval, rejection, rollback) are in the audit trail (`python3 run.py audit show`) and the "
        "model card's History.",
    ]
    return "\n".join(lines) + "\n"


def card_section(impact: dict, link: str) -> str:
    """The model card's "Change control" lines: the plan, the classification, and where the whole report is."""
    changes = impact["changes"]
    outside = [c["what"] for c in changes if not c["in_plan"]]
    summary = (
        f"{len(changes)} change(s), outside the plan: {', '.join(outside)}"
        if outside
        else f"{len(changes)} change(s), all in the plan"
        if changes
        else impact["note"] or "no change"
    )
    plan = f"v{impact['plan_version']} (`{(impact['plan_digest'] or '')[:12]}`)" if impact["plan_version"] else "none"
    return (
        f"\n\n### Change control\nChange plan {plan}: {summary}; decision: {impact['decision']}. The impact report "
        f"(what changed, each criterion with its interval, the decision and who): `{link}`."
    )
