"""The promotion gate: a challenger becomes champion only if it is sensitive enough and not worse than the champion.

Non-inferiority is judged on paired evidence: both models score the same images (the test split, and every
labelled site in ``registry.gate_sites``), and the 95% bootstrap CI of AUC(challenger) - AUC(champion) comes from
resamples shared by the two. The challenger passes where the CI's lower bound is at least ``-margin``: a new
version may be a little worse by chance, never clearly worse, and a point estimate that wins by noise is not
needed to promote a retrained model on fresh data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xray.evaluation.metrics import paired_auc_difference


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    previous_champion: str | None
    comparisons: dict[str, dict] = field(default_factory=dict)
    """Per image set ("test", "site:<name>"): :func:`xray.evaluation.metrics.paired_auc_difference`."""
    champion_error: str | None = None
    margin: float | None = None
    pending_approval: bool = False
    """Passed the gate with registry.require_approval: a candidate until a person approves it."""
    margins: dict[str, float] = field(default_factory=dict)
    """Per image set, a margin other than ``margin`` (a change plan's site and subgroup margins)."""
    change_control: dict = field(default_factory=dict)
    """The change plan's classification of the version and its criteria (xray.registry.control.plan), if any."""


@dataclass
class Scores:
    """Both models' probabilities on each image set the gate compares on (``test``, ``test:<site>``,
    ``subgroup:...``, ``site:<name>``), with the labels; ``champion_error`` when the champion could not be scored."""

    champion: str | None
    labels: dict[str, list[int]] = field(default_factory=dict)
    challenger: dict[str, list[float]] = field(default_factory=dict)
    champion_probabilities: dict[str, list[float]] = field(default_factory=dict)
    champion_error: str | None = None

    @classmethod
    def of(cls, champion: str | None, labels: dict, challenger: dict) -> Scores:
        as_list = lambda values: np.asarray(values).tolist()  # noqa: E731 - JSON-able lists, not arrays
        # 0/1 as ints, as the field says: ZenML's serializer warns once per float label otherwise.
        ints = {k: np.asarray(v).astype(int).tolist() for k, v in labels.items()}
        return cls(champion, ints, {k: as_list(v) for k, v in challenger.items()})


def decide_on(
    scores: Scores,
    test_sensitivity: float,
    min_sensitivity: float,
    margin: float,
    samples: int,
    seed: int,
    margins: dict[str, float] | None = None,
):
    """:func:`decide` on the paired comparisons of ``scores`` (none when the champion was not scored)."""
    comparisons = {
        name: compare(
            np.asarray(scores.labels[name]),
            np.asarray(scores.challenger[name]),
            np.asarray(probabilities),
            samples,
            seed,
        )
        for name, probabilities in scores.champion_probabilities.items()
    }
    return decide(
        test_sensitivity, min_sensitivity, scores.champion, comparisons, margin, scores.champion_error, margins
    )


def compare(y: np.ndarray, p_challenger: np.ndarray, p_champion: np.ndarray, samples: int, seed: int) -> dict:
    return paired_auc_difference(y, p_challenger, p_champion, samples, seed) | {"images": int(len(y))}


def _describe(name: str, comparison: dict, margins: dict[str, float] | None = None) -> str:
    within = f" (margin {margins[name]:g})" if margins and name in margins else ""
    return (
        f"{name}{within}: AUC {comparison['auc_challenger']:.4f} vs champion {comparison['auc_champion']:.4f}, "
        f"difference {comparison['auc_difference']:+.4f} (95% CI {comparison['auc_difference_ci_low']:+.4f} to "
        f"{comparison['auc_difference_ci_high']:+.4f}, {comparison['images']} images)"
    )


def decide(
    test_sensitivity: float,
    min_sensitivity: float,
    champion_version: str | None,
    comparisons: dict[str, dict],
    margin: float,
    champion_error: str | None = None,
    margins: dict[str, float] | None = None,
) -> PromotionDecision:
    """The rule, in order:

    1. test sensitivity at the val-chosen threshold below ``min_sensitivity``: rejected;
    2. no champion: promoted;
    3. a champion that could not be scored (deleted, unreadable): rejected, with the error;
    4. any image set whose paired CI lower bound is below ``-margin`` (its own in ``margins``, where given):
       rejected, naming each;
    5. otherwise promoted.
    """
    margins = dict(margins or {})

    def decision(promoted: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(
            promoted, reason, champion_version, comparisons, champion_error, margin, margins=margins
        )

    if not test_sensitivity >= min_sensitivity:
        return decision(False, f"test_sensitivity {test_sensitivity:.4f} < min_sensitivity {min_sensitivity:g}")
    if champion_version is None:
        return decision(True, f"no champion yet; test_sensitivity {test_sensitivity:.4f} >= {min_sensitivity:g}")
    if champion_error is not None:
        return decision(
            False,
            f"champion v{champion_version} could not be scored ({champion_error}); not promoted "
            "without a comparison: repair or re-point the alias, or promote by hand",
        )
    if "test" not in comparisons:
        raise ValueError("the gate needs the paired comparison on the test split")
    failing = {
        name: c for name, c in comparisons.items() if not c["auc_difference_ci_low"] >= -margins.get(name, margin)
    }
    if failing:
        return decision(
            False,
            f"inferior to champion v{champion_version} beyond {'its margin' if margins else f'the margin {margin:g}'} on "
            + "; ".join(_describe(name, c, margins) for name, c in failing.items()),
        )
    return decision(
        True,
        f"non-inferior to champion v{champion_version} within {'its margin' if margins else f'the margin {margin:g}'} on "
        + "; ".join(_describe(name, c, margins) for name, c in comparisons.items())
        + f"; test_sensitivity {test_sensitivity:.4f} >= {min_sensitivity:g}",
    )


def tags(decision: PromotionDecision) -> dict:
    """Model version tags: every number of the gate, the decision and its reason (values as they are; the store
    writes them as text)."""
    out: dict[str, object] = {
        "promotion_decision": "pending_approval"
        if decision.pending_approval
        else "promoted"
        if decision.promoted
        else "rejected",
        "promotion_reason": decision.reason[:4900],
        "gate.champion_version": decision.previous_champion or "none",
    }
    if decision.margin is not None:
        out["gate.margin"] = decision.margin
    if decision.champion_error:
        out["gate.champion_error"] = decision.champion_error[:4900]
    for name, comparison in decision.comparisons.items():
        for key, value in comparison.items():
            out[f"gate.{name}.{key}"] = value
        if name in decision.margins:
            out[f"gate.{name}.margin"] = decision.margins[name]
    return out


def markdown(decision: PromotionDecision, min_sensitivity: float) -> str:
    """The model card's "Promotion gate" section."""
    lines = [
        f"**{'Passed' if decision.promoted else 'Did not pass'} the promotion gate.** {decision.reason}.",
        "",
        "Passing makes a version champion unless another run moved the champion while it was gated (promotions are "
        "serialised; the version's `promotion_decision` tag and the registry's alias say what happened).",
        "",
        f"Rule: test sensitivity at the val-chosen threshold >= {min_sensitivity:g}; then, against the champion "
        f"of the time, the paired bootstrap 95% CI of AUC(this version) - AUC(champion) must have its lower bound "
        f">= -{decision.margin if decision.margin is not None else 0:g} on the test split and on every gate site."
        + (
            " Under the change plan each set has its own margin: "
            + ", ".join(f"{name} {value:g}" for name, value in decision.margins.items())
            + "."
            if decision.margins
            else ""
        ),
    ]
    if decision.comparisons:
        lines += [
            "",
            "| image set | images | AUC (this version) | AUC (champion) | difference | 95% CI |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, c in decision.comparisons.items():
            lines.append(
                f"| {name} | {c['images']} | {c['auc_challenger']:.4f} | {c['auc_champion']:.4f} | "
                f"{c['auc_difference']:+.4f} | {c['auc_difference_ci_low']:+.4f} to "
                f"{c['auc_difference_ci_high']:+.4f} |"
            )
    return "\n".join(lines)
