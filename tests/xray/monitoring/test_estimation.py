"""Performance before the labels (xray.monitoring.performance.estimation and comparison): the expected confusion
matrix and AUC, the prevalence, the bands against labels drawn the way the world draws them, the verdict's reasons,
and the estimate beside feedback's realised metrics."""

import json
import logging
import re
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from support import mlflow_store
from xray.config.evaluate import EvaluateConfig
from xray.evaluation.metrics import choose_threshold
from xray.evaluation.recipes import apply_operating_point, site_operating_point
from xray.monitoring import prediction_log
from xray.monitoring.performance import comparison, estimation, feedback, label_shift
from xray.monitoring.performance.estimation import RELIABLE, UNRELIABLE, Reference, Settings
from xray.monitoring.report import estimated_figures

MONDAY = datetime(2026, 11, 23, 9, tzinfo=timezone.utc)  # ISO week 2026-W48
REFERENCE_PREVALENCE = 0.74  # the default recipe's val: a share of train
SEPARATION = 1.6  # class means of the logit at +-1.6 sd: AUC about 0.96, the champion's test AUC range


class World:
    """A model whose logit is N(+-SEPARATION, 1) per class and whose probability is the exact posterior at the
    reference prevalence (what a Platt fit on a large val gives); its reference scores are val's."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        y, p = self.draw(4000, REFERENCE_PREVALENCE)
        self.threshold, _ = choose_threshold(y, p, "min_sensitivity", 0.95)
        self.val_probabilities = p
        self.val_scores = self.rng.lognormal(-1.2, 0.5, 1000)

    def draw(self, n: int, prevalence: float, separation: float = SEPARATION) -> tuple[np.ndarray, np.ndarray]:
        y = (self.rng.random(n) < prevalence).astype(int)
        logit = self.rng.normal(np.where(y == 1, separation, -separation), 1.0)
        prior = np.log(REFERENCE_PREVALENCE / (1 - REFERENCE_PREVALENCE))
        return y, 1 / (1 + np.exp(-(2 * SEPARATION * logit + prior)))

    def reference(self) -> Reference:
        profile = SimpleNamespace(
            val_probabilities=self.val_probabilities, val_ood_fraction=0.02, alpha=0.01, val_scores=self.val_scores
        )
        return Reference.of(profile)

    def log(self, p, when=MONDAY, site="", point="version", status="ok", scores=None, start=0, version="3"):
        n = len(p)
        table = pd.DataFrame(
            {
                "path": [f"img/{i}.jpeg" for i in range(start, start + n)],
                "sha256": [f"{i:064x}" for i in range(start, start + n)],
                "probability": p,
                "threshold": self.threshold,
                # val's distribution, none flagged unless the test gives its own scores
                "ood_score": np.minimum(self.rng.lognormal(-1.2, 0.5, n), 0.95) if scores is None else scores,
                "status": status,
                "reason": "",
                "site": site,
                "operating_point": point,
                "model_version": version,
            }
        )
        flagged = (table["status"] == "ok") & (table["ood_score"] > 1)  # as the predictor says it
        table.loc[flagged, ["status", "reason"]] = ["out_of_distribution", "image content unlike the training images"]
        table["label"] = np.where(table["probability"] >= self.threshold, "PNEUMONIA", "NORMAL")
        return prediction_log.log_rows(table, "batch", "/data/batch", now=when)


def realised(y, p, threshold) -> tuple[float, float]:
    called = p >= threshold
    return (called & (y == 1)).sum() / (y == 1).sum(), (~called & (y == 0)).sum() / (y == 0).sum()


def test_expected_counts_are_the_probabilities_summed_at_each_rows_own_threshold():
    p = np.array([0.9, 0.8, 0.3, 0.6, 0.1])
    called = p >= np.array([0.5, 0.85, 0.5, 0.5, 0.05])  # the second and last rows at other operating points
    result = estimation.estimate_rows(p, called, 0.5, Settings(samples=50, adjust_prevalence=False))
    assert result["expected_tp"] == pytest.approx(0.9 + 0.6 + 0.1)
    assert result["expected_fn"] == pytest.approx(0.8 + 0.3)
    assert result["expected_fp"] == pytest.approx(0.1 + 0.4 + 0.9)
    assert result["expected_tn"] == pytest.approx(0.2 + 0.7)
    assert result["estimated_sensitivity"] == pytest.approx(1.6 / 2.7)
    assert result["estimated_ppv"] == pytest.approx(1.6 / 3.0)
    assert result["estimated_npv"] == pytest.approx(0.9 / 2.0)


def test_the_expected_auc_is_every_pair_weighted_by_the_chance_it_is_a_positive_negative_pair():
    rng = np.random.default_rng(3)
    p = np.round(rng.uniform(0.02, 0.98, 40), 1)  # rounded: many ties, which count half
    result = estimation.estimate_rows(p, p >= 0.5, 0.5, Settings(samples=20, adjust_prevalence=False))
    numerator = denominator = 0.0
    for i in range(len(p)):
        for j in range(len(p)):
            if i != j:
                weight = p[i] * (1 - p[j])
                numerator += weight * (1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0)
                denominator += weight
    assert result["estimated_auc"] == pytest.approx(numerator / denominator)
    # and it is what labels drawn from the probabilities give on average (Mann-Whitney on mid-ranks)
    labels = rng.random((20000, len(p))) < p
    positives = labels.sum(axis=1)
    labels, positives = (
        labels[(positives > 0) & (positives < len(p))],
        positives[(positives > 0) & (positives < len(p))],
    )
    ranks = rankdata(p)
    draws = (labels @ ranks - positives * (positives + 1) / 2) / (positives * (len(p) - positives))
    assert draws[0] == pytest.approx(roc_auc_score(labels[0], p))
    assert result["estimated_auc"] == pytest.approx(draws.mean(), abs=0.005)


def test_the_prevalence_is_the_maximum_likelihood_prior_that_em_converges_to():
    world = World(1)
    y, p = world.draw(3000, 0.25)
    found = label_shift.prevalence_mle(p / 0.74, (1 - p) / 0.26, np.ones((1, len(p))))[0]
    prior = 0.74
    for _ in range(2000):  # Saerens, Latinne and Decaestecker (2002)
        prior = label_shift.reweight(p, 0.74, prior).mean()
    assert found == pytest.approx(prior, abs=1e-6)
    assert found == pytest.approx(y.mean(), abs=0.03)
    # every row of the weights is its own draw; images that are all but certainly one class pin the boundary
    certain = np.array([1e-6, 1 - 1e-6])
    ratios = certain / 0.74, (1 - certain) / 0.26
    assert label_shift.prevalence_mle(*ratios, np.array([[0.0, 3.0], [3.0, 0.0]])).tolist() == [1.0, 0.0]


def test_under_prevalence_shifts_from_10_to_90_percent_the_estimate_meets_the_issue_targets():
    """Label shift, as a pneumonia season is: periods of 150 images whose images of each class look like the
    reference's. The realised values come from labels the world drew, never seen by the estimate."""
    world = World(2)
    errors, covered, plain = [], [], []
    for prevalence in np.linspace(0.1, 0.9, 9):
        for seed in range(3):
            y, p = world.draw(150, prevalence)
            sensitivity, specificity = realised(y, p, world.threshold)
            called = p >= world.threshold
            result = estimation.estimate_rows(p, called, 0.74, Settings(samples=300, seed=seed))
            unadjusted = estimation.estimate_rows(p, called, 0.74, Settings(samples=10, adjust_prevalence=False))
            for name, truth in (("sensitivity", sensitivity), ("specificity", specificity)):
                errors.append(abs(result[f"estimated_{name}"] - truth))
                plain.append(abs(unadjusted[f"estimated_{name}"] - truth))
                covered.append(result[f"estimated_{name}_low"] <= truth <= result[f"estimated_{name}_high"])
            assert result["estimated_prevalence"] == pytest.approx(y.mean(), abs=0.1)
    assert np.mean(errors) <= 0.05 and np.mean(covered) >= 0.9
    assert np.mean(plain) > 1.5 * np.mean(errors)  # calibrated at 74% is miscalibrated at 10%: plain CBPE is not


def test_bands_hold_the_estimate_are_reproducible_and_empty_input_is_nan():
    world = World(4)
    _, p = world.draw(120, 0.5)
    first = estimation.estimate_rows(p, p >= world.threshold, 0.74, Settings(samples=200, seed=7))
    again = estimation.estimate_rows(p, p >= world.threshold, 0.74, Settings(samples=200, seed=7))
    assert first == again
    for name in estimation.ESTIMATED:
        assert first[f"estimated_{name}_low"] <= first[f"estimated_{name}"] <= first[f"estimated_{name}_high"]
    empty = estimation.estimate_rows([], [], 0.74, Settings(samples=10))
    assert empty["answered"] == 0 and np.isnan(empty["estimated_sensitivity"])


def test_a_clean_period_is_reliable_and_each_departure_is_unreliable_with_its_reason():
    world = World(5)
    reference = world.reference()
    settings = Settings(samples=100)
    _, p = world.draw(300, 0.5)
    scores = world.rng.lognormal(-1.2, 0.5, len(p))  # val's distribution: a few images above 1 by chance
    clean = world.log(p, scores=scores)
    answered = int((clean["status"] == "ok").sum())

    def verdict(rows):
        result = estimation.estimate_group(rows, reference, settings)
        return result["verdict"], result["reasons"]

    assert verdict(clean) == (RELIABLE, "")
    flagged = clean.copy()
    flagged.loc[:44, "status"] = "out_of_distribution"  # 15% against 2% on val
    assert re.match(r"out of distribution: 4\d of 300 readable images \(1\d\.\d%\) against 2\.0%", verdict(flagged)[1])
    scoped = clean.copy()
    scoped.loc[:29, ["status", "reason"]] = ["out_of_scope", "PatientAge 045Y outside the validated 1-5 years"]
    assert verdict(scoped)[1].startswith("out of scope: 30 of 300 images")
    drifted = world.log(p, scores=world.rng.lognormal(-1.0, 0.5, len(p)))  # every image a little further
    assert verdict(drifted)[1].startswith("drift: ood_score unlike val's")
    assert (drifted["status"] == "ok").mean() > 0.95  # few flagged one by one: only the distribution tells
    foreign = world.log(p, site="hospital-b", point="version", scores=scores)
    assert verdict(foreign)[1].startswith(f"site without its own calibration: {answered} answers of site hospital-b")
    assert verdict(world.log(p[:25], scores=np.full(25, 0.3)))[1].startswith("too few images: 25 answered")
    assert estimation.estimate_group(clean, None, settings)["reasons"].startswith("no reference profile")
    unknown = world.log(p, site="hospital-b", point="site:hospital-b", scores=scores)
    assert "no reference prevalence for operating point site:hospital-b" in verdict(unknown)[1]


def test_probabilities_unlike_vals_at_any_prevalence_say_the_calibration_may_not_hold():
    """Label shift keeps each class's probabilities as val's: the test fits the prevalence and accepts. A population
    whose NORMAL images look more like PNEUMONIA to the model than val's did (the calibration no longer holds) is
    refused, at any prevalence."""
    world = World(9)
    reference = world.val_probabilities
    p_values = [
        label_shift.label_shift_test(world.draw(200, q)[1], reference, 300, 0).p_value for q in np.arange(1, 10) / 10
    ]
    assert sum(p < 0.01 for p in p_values) <= 1 and np.median(p_values) > 0.2  # a test at 1%, roughly uniform
    y, p = world.draw(300, 0.3)
    logit = np.log(p / (1 - p)) + np.where(y == 0, 4.0, 0.0)  # NORMAL images half way to PNEUMONIA
    test = label_shift.label_shift_test(1 / (1 + np.exp(-logit)), reference, 300, 0)
    assert test.p_value < 0.01 and test.distance > 0.1 and np.isnan(test.score_distance)
    rows = world.log(1 / (1 + np.exp(-logit)))
    reasons = estimation.estimate_group(rows, world.reference(), Settings(samples=300))["reasons"]
    assert reasons.startswith("calibration: the answers are unlike val's at any prevalence (Kolmogorov-Smirnov D = ")


def test_the_reference_prevalence_of_a_sites_operating_point_is_the_share_it_was_fitted_on():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.clip(0.3 + 0.5 * (y - 0.3) + rng.normal(0, 0.15, 300), 0.01, 0.99)
    point = site_operating_point(y, p, EvaluateConfig())
    assert estimation.point_prevalence(point) == pytest.approx(y.mean())
    assert estimation.point_prevalence({"prevalence": 0.4}) == 0.4
    assert estimation.point_prevalence({"fitted_on": "unknown"}) is None
    world = World(6)
    profile = SimpleNamespace(
        val_probabilities=world.val_probabilities, val_ood_fraction=0.0, alpha=0.01, val_scores=[]
    )
    reference = Reference.of(profile, {"b": point, "c": {}})
    assert set(reference.prevalence) == {"version", "site:b"} and reference.ood_fraction == 0.01
    assert reference.prevalence["version"] == pytest.approx(0.74, abs=0.02)


def test_the_log_is_estimated_per_week_site_version_and_subgroup_without_a_label():
    world = World(7)
    _, p = world.draw(200, 0.3)
    log = pd.concat(
        [
            world.log(p[:100]),
            world.log(p[:100], when=MONDAY + timedelta(hours=2)),  # the same batch rerun: counted once
            world.log(p[100:], when=MONDAY + timedelta(days=7), start=100),
            world.log(p, site="b", point="site:b", when=MONDAY + timedelta(days=7), start=200),
        ],
        ignore_index=True,
    )
    log["view"] = np.where(np.arange(len(log)) % 2, "AP", "PA")
    log = log.drop(columns=["label"])  # the label a reader saw is not needed either
    table = estimation.estimate(log, {"3": world.reference()}, "week", Settings(samples=50))
    whole = table[table["subgroup"] == ""]
    assert whole[["period", "site", "answered"]].values.tolist() == [
        ["2026-W48", "", 100],
        ["2026-W49", "", 100],
        ["2026-W49", "b", 200],
    ]
    assert sorted(table.loc[table["period"] == "2026-W48", "subgroup"]) == ["", "view=AP", "view=PA"]
    assert "no reference prevalence for operating point site:b" in whole["reasons"].iloc[2]


def test_side_by_side_alerts_only_on_a_reliable_drop_and_says_estimated():
    world = World(8)
    y_good, p_good = world.draw(400, 0.5)
    y_bad, p_bad = world.draw(400, 0.5, separation=0.5)  # a weak model: many pneumonias under the threshold
    weeks = [world.log(p_good), world.log(p_bad, when=MONDAY + timedelta(days=7), start=400)]
    log = pd.concat(weeks, ignore_index=True)
    log.loc[log.index[-40:], "status"] = "out_of_distribution"  # only the last week: 10% flagged
    table = estimation.estimate(log, {"3": world.reference()}, "week", Settings(samples=200))
    truth = np.r_[y_good, y_bad]
    labels = pd.DataFrame({"sha256": log["sha256"], "label": np.where(truth == 1, "PNEUMONIA", "NORMAL")})
    labels.attrs["key"] = "sha256"
    realised_table = feedback.performance(feedback.join(labels, log), samples=100)
    both = comparison.side_by_side(table, realised_table)
    assert both["period"].tolist() == ["2026-W48", "2026-W49"]
    assert both["answered"].tolist() == [400, 360] and both["realised_answered"].tolist() == [400, 360]
    assert both["covered_sensitivity"].iloc[0] == 1.0 and both["verdict"].tolist() == [RELIABLE, UNRELIABLE]
    # the realised sensitivity of the weak week is low, its estimate too, but it is unreliable: no alert
    assert both["sensitivity"].iloc[1] < 0.9 and both["estimated_sensitivity_high"].iloc[1] < 0.95
    assert comparison.degradations(table, 0.95, {"3": 0.99}, 0.01) == []
    trusted = table.assign(verdict=RELIABLE)
    alerts = comparison.degradations(trusted, 0.95, {"3": 0.99}, 0.01)
    assert alerts[0].startswith("estimated sensitivity degraded in period 2026-W49, site (none), v3")
    assert any(line.startswith("estimated AUC degraded") for line in alerts)
    keys = {key.split("/")[0] for key, _, _ in comparison.metrics(table)}
    assert {"estimated_sensitivity", "estimated_auc_low", "estimated_reliable"} <= keys
    assert {step for _, _, step in comparison.metrics(table)} == {202648, 202649}
    assert "out of distribution" in comparison.lines(table)[1]
    summary = comparison.summary(table, alerts)
    assert summary["estimated_reliable"] == 1 and summary["estimates"][1]["verdict"] == UNRELIABLE
    empty = comparison.summary(estimation.estimate(world.log(p_good[:10], status="unreadable"), {}, "week"), [])
    assert empty["estimates"][0]["estimated_sensitivity"] is None and "NaN" not in json.dumps(empty)
    figures = estimated_figures(both, 0.95, 0.9)
    assert set(figures) == {"estimated_sensitivity", "estimated_specificity", "estimated_auc"}
    assert all(isinstance(image, Image.Image) and image.width > 300 for image in figures.values())


def test_a_week_made_of_out_of_scope_or_drifted_images_is_unreliable_with_its_reason():
    """Acceptance: a period of images out of scope (all, or a third), or of images a shift moved (flagged one by one,
    or each only a little), is unreliable, and its reasons say which."""
    world = World(10)
    reference, settings = world.reference(), Settings(samples=100)
    _, p = world.draw(150, 0.5)
    scoped = world.log(p, scores=world.rng.lognormal(-1.2, 0.5, len(p)))
    scoped[["status", "reason"]] = ["out_of_scope", "PatientAge 045Y outside the validated 1-5 years"]
    shifted = world.log(p, scores=world.rng.lognormal(0.5, 0.3, len(p)))  # a synthetic shift: most images flagged
    third = world.log(p, scores=world.rng.lognormal(-1.2, 0.5, len(p)))
    third.loc[:49, ["status", "reason"]] = ["out_of_scope", "BodyPartExamined ABDOMEN, not CHEST"]
    nudged = world.log(p, scores=np.minimum(world.rng.lognormal(-0.7, 0.5, len(p)), 0.99))  # none flagged
    verdicts = {
        name: estimation.estimate_group(rows, reference, settings)
        for name, rows in (("scoped", scoped), ("shifted", shifted), ("third", third), ("nudged", nudged))
    }
    assert {v["verdict"] for v in verdicts.values()} == {UNRELIABLE}
    assert "out of scope: 150 of 150 images (100.0%)" in verdicts["scoped"]["reasons"]
    assert "too few images: 0 answered" in verdicts["scoped"]["reasons"]
    assert (shifted["status"] == "out_of_distribution").mean() > 0.8
    assert "out of distribution: " in verdicts["shifted"]["reasons"] and "drift: " in verdicts["shifted"]["reasons"]
    assert verdicts["third"]["reasons"].startswith("out of scope: 50 of 150 images")
    assert (nudged["status"] == "ok").all() and "drift: ood_score unlike val's" in verdicts["nudged"]["reasons"]
    lines = comparison.lines(
        pd.DataFrame([{"period": "2026-W48", "site": "", "model_version": "3"} | verdicts["scoped"]])
    )
    assert lines[0].endswith(verdicts["scoped"]["reasons"]) and "0 answered; no estimate; unreliable: " in lines[0]


@pytest.mark.slow
def test_monitor_from_log_estimates_the_log_per_week_alerts_on_a_reliable_drop_and_reads_no_label(
    tmp_path, monkeypatch
):
    """The monitoring pipeline's --from-log step on a prediction log in a folder: one estimate per week with its band
    and verdict, MLflow's estimated_* series a week a step, the alert of today on a reliable estimated drop only,
    labelled "estimated"; no labels file is ever read."""
    import mlflow
    from mlflow.tracking import MlflowClient

    import steps.estimate as step_module
    from xray.config.pipeline import PipelineConfig
    from xray.data import sites
    from xray.requests import MonitoringRequest

    world = World(11)
    _, p = world.draw(400, 0.5)
    first = world.log(p[:200])
    second = world.log(p[200:], when=MONDAY + timedelta(days=7), start=200)
    second.loc[second.index[:40], ["status", "reason"]] = ["out_of_distribution", "image content unlike training"]
    root = tmp_path / "prediction_log"
    for rows in (first, second):
        store = prediction_log.open_store(str(root))
        written = prediction_log.PredictionLog(str(root), "batch", "/data/batch", store=store)
        written.pending = [rows]
        written.flush()
    config = PipelineConfig.model_validate(
        {
            "monitoring": {"prediction_log": str(root)},
            "evaluate": {"bootstrap_samples": 100, "min_sensitivity": 0.995},  # the clean week's band is below
        }
    )
    request = MonitoringRequest(config=config, from_log=True)
    profile = SimpleNamespace(
        val_probabilities=world.val_probabilities, val_ood_fraction=0.02, alpha=0.01, val_scores=world.val_scores
    )
    calls = []
    fake_store = SimpleNamespace(
        load_reference_profile=lambda name, version: calls.append(version) or (profile, None),
        load_operating_points=lambda name, version: {},
        versions_test_auc=lambda client, name, versions: {"3": 0.9},
    )
    monkeypatch.setattr(step_module, "store", fake_store)
    posted = []
    monkeypatch.setattr(step_module, "post_alert", posted.append)

    def no_labels(*args, **kwargs):
        raise AssertionError("monitor --from-log read a labels file")

    monkeypatch.setattr(sites, "read_labels_file", no_labels)
    monkeypatch.setattr(feedback, "read_labels", no_labels)
    uri = mlflow_store(tmp_path)
    experiment = MlflowClient(uri).create_experiment("m", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            table, record, plots = step_module.estimate_from_log.entrypoint(request=request)
        history = MlflowClient().get_metric_history(run.info.run_id, "estimated_sensitivity/no-site/v3")
    finally:
        mlflow.set_tracking_uri(None)
    assert calls == ["3"]
    assert table[["period", "verdict"]].values.tolist() == [["2026-W48", RELIABLE], ["2026-W49", UNRELIABLE]]
    assert table["answered"].tolist() == [200, 160]
    assert record.summary["estimated_groups"] == 2 and record.summary["period"] == "week"
    assert record.summary["logged_predictions"] == 400 and len(record.summary["estimates"]) == 2
    assert re.match(
        r"period 2026-W48, site \(none\), v3: 200 answered; sensitivity 0\.\d{3} \(0\.\d{3}-0\.\d{3}\), specificity "
        r".*; reliable$",
        record.lines[0],
    )
    assert "; unreliable: " in record.lines[1] and "out of distribution: 40 of 200 readable images" in record.lines[1]
    assert record.lines[1].split("; ")[1].startswith("sensitivity 0.")  # shown, never alerted on (below the line too)
    assert posted == record.summary["estimated_alerts"] and len(posted) == 1
    assert posted[0].startswith("estimated sensitivity degraded in period 2026-W48, site (none), v3")
    assert [(m.step, round(m.value, 6)) for m in history] == [
        (202648, round(table["estimated_sensitivity"].iloc[0], 6)),
        (202649, round(table["estimated_sensitivity"].iloc[1], 6)),
    ]
    assert set(plots.images) == {"estimated_sensitivity", "estimated_specificity", "estimated_auc"}


def test_the_calibration_test_pools_the_periods_before_and_stays_quiet_under_label_shift(caplog):
    """A population whose NORMAL images look a little more like PNEUMONIA than val's: no week of 150 alone is
    refused, pooled with the weeks before it (up to three, same site and version) it is by the month's end, and the
    reason says why ood_score was not tested (a reference profile stored without val labels), as a warning does once;
    weeks that only change their prevalence (label shift: any mix of them is val re-weighted) pass pooled too."""
    verdicts = {}
    for shift in (0.0, 0.7):
        world = World(20)
        logs = []
        for week, q in enumerate((0.5, 0.3, 0.7, 0.5)):
            y, p = world.draw(150, q)
            z = np.log(p / (1 - p)) + np.where(y == 0, shift, 0.0)
            logs.append(world.log(1 / (1 + np.exp(-z)), when=MONDAY + timedelta(days=7 * week), start=1000 * week))
        log = pd.concat(logs, ignore_index=True)
        scores = world.rng.lognormal(-1.2, 0.5, len(world.val_probabilities))  # aligned with val's probabilities
        profile = SimpleNamespace(
            val_probabilities=world.val_probabilities, val_ood_fraction=0.02, alpha=0.01, val_scores=scores
        )
        with caplog.at_level(logging.WARNING, logger=estimation.__name__):
            table = estimation.estimate(log, {"3": Reference.of(profile)}, "week", Settings(samples=300))
        verdicts[shift] = table.loc[table["subgroup"] == "", "reasons"].tolist()
    warned = [r.getMessage() for r in caplog.records if "keeps no val labels" in r.getMessage()]
    assert (
        warned
        == [
            "version 3: its reference profile keeps no val labels, so the calibration test reads the "
            "probabilities alone, not ood_score (a profile fitted by the training pipeline of today keeps them)"
        ]
        * 2
    )
    assert verdicts[0.0] == ["", "", "", ""]
    assert not any(reason.startswith("calibration: the answers") for reason in verdicts[0.7])
    assert verdicts[0.7][3].startswith("calibration: this period's and the 450 earlier answers are unlike val's")
    assert verdicts[0.7][3].endswith("(ood_score not tested: the reference profile keeps no val labels)")


def test_a_sites_calibration_fitted_on_a_few_hundred_images_is_drawn_in_the_band():
    """A site's own operating point fitted on 177 of its images (as the benchmark's): its parameters are a sample, so
    the realised sensitivity and specificity of a week fall in bands that draw them (from the covariance the point
    records) about as often as they should, and less often in bands that take the fit as exact."""
    world = World(3)
    profile = SimpleNamespace(
        val_probabilities=world.val_probabilities, val_ood_fraction=0.02, alpha=0.01, val_scores=world.val_scores
    )

    def site(n, q):  # NORMAL images a little more like PNEUMONIA to the model than val's: the site's own calibration
        y = (world.rng.random(n) < q).astype(int)
        z = world.rng.normal(np.where(y == 1, SEPARATION, -1.0), 1.0)
        return y, 1 / (1 + np.exp(-(2 * SEPARATION * z + np.log(REFERENCE_PREVALENCE / (1 - REFERENCE_PREVALENCE)))))

    covered = {True: [], False: []}
    for _ in range(40):
        point = site_operating_point(*site(177, 0.6), EvaluateConfig())
        assert np.shape(point["calibration_covariance"]) == (2, 2)
        y, p = site(150, 0.5)
        p = apply_operating_point(p, point)
        rows = world.log(p, site="b", point="site:b").assign(threshold=point["threshold"])
        truth = realised(y, p, point["threshold"])
        for drawn in (True, False):
            used = point if drawn else {k: v for k, v in point.items() if k != "calibration_covariance"}
            result = estimation.estimate_group(rows, Reference.of(profile, {"b": used}), Settings(samples=200))
            for name, value in zip(("sensitivity", "specificity"), truth):
                covered[drawn].append(result[f"estimated_{name}_low"] <= value <= result[f"estimated_{name}_high"])
    assert np.mean(covered[True]) >= 0.9 and np.mean(covered[True]) > np.mean(covered[False]), covered
