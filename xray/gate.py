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

from xray.metrics import paired_auc_difference


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    previous_champion: str | None
    comparisons: dict[str, dict] = field(default_factory=dict)
    """Per image set ("test", "site:<name>"): :func:`xray.metrics.paired_auc_difference`."""
    champion_error: str | None = None
    margin: float | None = None


def compare(y: np.ndarray, p_challenger: np.ndarray, p_champion: np.ndarray, samples: int, seed: int) -> dict:
    return paired_auc_difference(y, p_challenger, p_champion, samples, seed) | {"images": int(len(y))}


def _describe(name: str, comparison: dict) -> str:
    return (
        f"{name}: AUC {comparison['auc_challenger']:.4f} vs champion {comparison['auc_champion']:.4f}, "
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
) -> PromotionDecision:
    """The rule, in order:

    1. test sensitivity at the val-chosen threshold below ``min_sensitivity``: rejected;
    2. no champion: promoted;
    3. a champion that could not be scored (deleted, unreadable): rejected, with the error;
    4. any image set whose paired CI lower bound is below ``-margin``: rejected, naming each;
    5. otherwise promoted.
    """

    def decision(promoted: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(promoted, reason, champion_version, comparisons, champion_error, margin)

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
    failing = {name: c for name, c in comparisons.items() if not c["auc_difference_ci_low"] >= -margin}
    if failing:
        return decision(
            False,
            f"inferior to champion v{champion_version} beyond the margin {margin:g} on "
            + "; ".join(_describe(name, c) for name, c in failing.items()),
        )
    return decision(
        True,
        f"non-inferior to champion v{champion_version} within the margin {margin:g} on "
        + "; ".join(_describe(name, c) for name, c in comparisons.items())
        + f"; test_sensitivity {test_sensitivity:.4f} >= {min_sensitivity:g}",
    )


def tags(decision: PromotionDecision) -> dict[str, str]:
    """Model version tags: every number of the gate, the decision and its reason."""
    out = {
        "promotion_decision": "promoted" if decision.promoted else "rejected",
        "promotion_reason": decision.reason[:4900],
        "gate.champion_version": decision.previous_champion or "none",
    }
    if decision.margin is not None:
        out["gate.margin"] = f"{decision.margin:g}"
    if decision.champion_error:
        out["gate.champion_error"] = decision.champion_error[:4900]
    for name, comparison in decision.comparisons.items():
        for key, value in comparison.items():
            out[f"gate.{name}.{key}"] = f"{value:.6g}" if isinstance(value, float) else str(value)
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
        f">= -{decision.margin if decision.margin is not None else 0:g} on the test split and on every gate site.",
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


def score_champion(model_name: str, champion_version: str, image_sets: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """The champion's probabilities on each set of image files, through the champion's own registered folder."""
    from xray import registry
    from xray.data import make_spec_for_inference
    from xray.inference import predict_paths

    predictor, _ = registry.load_predictor(model_name, champion_version)
    spec = make_spec_for_inference(predictor.image_size)
    return {name: predict_paths(predictor.model, paths, spec) for name, paths in image_sets.items()}


def run(
    model_name: str,
    champion_version: str | None,
    image_sets: dict[str, list[str]],
    labels: dict[str, np.ndarray],
    challenger: dict[str, np.ndarray],
    test_sensitivity: float,
    min_sensitivity: float,
    margin: float,
    samples: int,
    seed: int,
) -> PromotionDecision:
    """Score the champion on the challenger's image sets, compare pairwise, decide.

    A champion that cannot be loaded or scored is reported in the decision (never skipped): the gate then rejects.
    """
    comparisons: dict[str, dict] = {}
    champion_error = None
    if champion_version is not None and test_sensitivity >= min_sensitivity:
        try:
            champion = score_champion(model_name, champion_version, image_sets)
        except Exception as error:  # noqa: BLE001 - whatever the cause, the gate must say it and not promote
            champion_error = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        else:
            comparisons = {
                name: compare(labels[name], challenger[name], champion[name], samples, seed) for name in image_sets
            }
    return decide(test_sensitivity, min_sensitivity, champion_version, comparisons, margin, champion_error)


def image_sets(model, dataset, spec, test_probabilities: np.ndarray, gate_sites, data, s3, workdir):
    """(paths, labels, challenger probabilities) per image set: the test split, already scored by the challenger,
    and each labelled gate site (loaded through the site checks into a folder of ``workdir``, and scored here).
    The sites' paths point into ``workdir``: the caller keeps it until the champion has scored them too."""
    import logging
    from pathlib import Path

    from xray import data as xdata
    from xray import sites
    from xray.inference import predict_paths

    test_rows = xdata.select(dataset.manifest, "test", spec)
    paths, labels, challenger = (
        {"test": dataset.paths(test_rows)},
        {"test": xdata.labels_of(test_rows)},
        {"test": test_probabilities},
    )
    for index, uri in enumerate(gate_sites):
        site, report = sites.load_site(uri, Path(workdir) / f"site-{index}", data, s3)
        name = f"site:{sites.site_name(uri)}"
        paths[name], labels[name] = site.paths(site.manifest), sites.labels(site)
        challenger[name] = predict_paths(model, paths[name], spec)
        logging.getLogger(__name__).info("gate site %s (%s): %s", name, uri, report["counts"])
    return paths, labels, challenger
