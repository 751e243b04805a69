"""Estimated performance checked against truth (issue #44): weeks of real predictions whose labels the estimate never
sees, then the labels.

    python benchmarks/performance_estimation.py [--model-version champion] [--samples 1000] [--seed 0]
    python benchmarks/bench.py --only performance_estimation_mae       # the same, as make bench runs it

A registered version (the local store's champion: `make train` first) answers every image through its own predictor
(decode, scope, out-of-distribution check, calibrated probability, its threshold), the rows go through the prediction
log's own row builder, one ISO week per period, and :func:`estimation.estimate` (no label) and
:func:`feedback.performance` (the test split's labels) measure each week; :func:`comparison.side_by_side` joins them.
Everything the estimate uses comes from the version (its val calibration, threshold and reference profile) and the
project's defaults (``evaluate.bootstrap_samples``, ``monitoring.drift_alpha``, ``monitoring.feedback_min_per_class``);
the periods are drawn from the test split by ``--seed``, so nothing is chosen on it.

Periods of 150 images (docs/BENCHMARKS.md, "Estimated performance", lists them with their expected verdicts):

- prevalence: 10% to 90% PNEUMONIA in steps of 10, three draws each (27);
- subgroup: PNEUMONIA only viral, or only bacterial (the file names say which), at 50%, two draws each (4);
- image shift: each synthetic shift of ``xray.monitoring.drift.SHIFTS`` on all 150 images, and on 30 of them (10);
- another site's look: benchmarks/site_retraining.py's acquisition (exposure curve, contrast, noise) on all (2);
- adults: 120 test images and the 55 adult X-rays of ``near_ood_adult_cxr_224.zip`` (unlabelled) (1);
- DICOM: 150 test images as DICOM in scope (age 3), all out of scope (age 45), 50 of 150 out of scope (3).

The value recorded is the mean absolute error of estimated against realised sensitivity and specificity over the
periods the verdict calls reliable (target at most 0.05); beside it the share of those periods' realised values inside
the estimate's band (target at least 0.9), plain CBPE (no prevalence adjustment) on the same periods, and the verdict
of every period with its reasons.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import time
import zipfile
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from PIL import Image  # noqa: E402

from xray.config.evaluate import EvaluateConfig  # noqa: E402
from xray.config.monitoring import MonitoringConfig  # noqa: E402
from xray.config.registry import MODEL_NAME  # noqa: E402
from xray.monitoring import prediction_log  # noqa: E402
from xray.monitoring.drift import SHIFTS, apply_shift  # noqa: E402
from xray.monitoring.performance import comparison, estimation, feedback  # noqa: E402

logger = logging.getLogger("performance_estimation")
SHARED = ROOT.parent / "shared" / "data"
SIZE = 150
FIRST_WEEK = datetime(2027, 1, 4, 9, tzinfo=timezone.utc)  # a Monday: ISO week 2027-W01
EXPECTED_UNRELIABLE = {"image shift, all", "adults", "DICOM, all out of scope"}
"""Periods made of out-of-scope or drifted images: the verdict must call them unreliable."""


def test_split() -> pd.DataFrame:
    """The Kaggle test split: name, bytes, truth (1 = PNEUMONIA) and kind (normal, bacteria, virus)."""
    with zipfile.ZipFile(SHARED / "chest_xray_224.zip") as archive:
        names = sorted(n for n in archive.namelist() if "/test/" in n and n.endswith(".jpeg"))
        data = [archive.read(n) for n in names]
    kind = ["virus" if "_virus_" in n else "bacteria" if "_bacteria_" in n else "normal" for n in names]
    return pd.DataFrame({"name": names, "data": data, "truth": [int("/PNEUMONIA/" in n) for n in names], "kind": kind})


def adults() -> list[bytes]:
    with zipfile.ZipFile(SHARED / "near_ood_adult_cxr_224.zip") as archive:
        return [archive.read(n) for n in sorted(archive.namelist()) if n.lower().endswith((".jpg", ".jpeg", ".png"))]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def variant(data: bytes, how: str, seed: int) -> bytes:
    """The bytes a site would send: the image as it is, shifted, with another site's look, or as a DICOM file."""
    if how == "original":
        return data
    if how in SHIFTS:
        with Image.open(io.BytesIO(data)) as picture:
            return _png(apply_shift(how, np.asarray(picture.convert("RGB")), seed))
    if how == "site look":
        from site_retraining import acquisition

        return _png(acquisition(data, np.random.default_rng(seed)))
    if how.startswith("dicom age "):
        from fixtures.dicom_factory import radiograph

        return radiograph(data, age=how.removeprefix("dicom age "), Manufacturer="Benchmark Vendor")
    raise ValueError(how)


def periods(test: pd.DataFrame, seed: int, usable: np.ndarray | None = None) -> list[dict]:
    """Each period: ``kind``, ``label``, ``members`` ((test index or adult index, how) pairs). With ``usable`` (a mask
    of test images), only the prevalence and subgroup periods, drawn from those images."""
    rng = np.random.default_rng(seed)
    usable = np.ones(len(test), dtype=bool) if usable is None else usable
    normal = np.flatnonzero((test["kind"] == "normal") & usable)
    pools = {k: np.flatnonzero((test["kind"] == k) & usable) for k in ("bacteria", "virus")}
    pneumonia = np.flatnonzero((test["truth"] == 1) & usable)

    def draw(positives: int, pool=pneumonia, size=SIZE) -> list[int]:
        chosen = [*rng.choice(pool, positives, replace=False), *rng.choice(normal, size - positives, replace=False)]
        return [int(i) for i in rng.permutation(chosen)]

    def period(kind, label, indices, how="original", changed=None):
        changed = len(indices) if changed is None else changed
        members = [(i, how if n < changed else "original") for n, i in enumerate(indices)]
        return {"kind": kind, "label": label, "members": members}

    made = []
    for share in np.round(np.arange(0.1, 0.91, 0.1), 1):
        made += [period("prevalence", f"{share:.0%} PNEUMONIA", draw(round(SIZE * share))) for _ in range(3)]
    for kind, pool in pools.items():
        made += [period("subgroup", f"only {kind} PNEUMONIA, 50%", draw(SIZE // 2, pool)) for _ in range(2)]
    if not usable.all():
        return made
    for shift in SHIFTS:
        indices = draw(90)
        made.append(period("image shift, all", f"{shift}, all 150", indices, shift))
        made.append(period("image shift, 20%", f"{shift}, 30 of 150", indices, shift, 30))
    made += [period("site look", "another site's acquisition, all", draw(90), "site look") for _ in range(2)]
    made.append(period("adults", "120 test + 55 adult X-rays", draw(72, size=120)))
    made[-1]["members"] += [(f"adult{i}", "original") for i in range(55)]
    indices = draw(90)
    made.append(period("DICOM, in scope", "DICOM, age 3, all", indices, "dicom age 003Y"))
    made.append(period("DICOM, all out of scope", "DICOM, age 45, all", indices, "dicom age 045Y"))
    mixed = period("DICOM, 33% out of scope", "DICOM, age 45 for 50 of 150", indices, "dicom age 045Y", 50)
    mixed["members"] = [(i, how if how != "original" else "dicom age 003Y") for i, how in mixed["members"]]
    made.append(mixed)
    return made


def predict_all(predictor, test: pd.DataFrame, adult: list[bytes], made: list[dict], seed: int, site=None) -> dict:
    """(member) -> prediction row with its bytes' sha256, every distinct image predicted once, 64 at a time, at
    ``site``'s operating point (none: the version's)."""
    wanted = sorted({member for p in made for member in p["members"]}, key=str)
    encoded = []
    for index, how in wanted:
        data = adult[int(index[5:])] if isinstance(index, str) else test["data"].iloc[index]
        encoded.append(variant(data, how, seed + (index if isinstance(index, int) else 0)))
    rows, started = [], time.perf_counter()
    for start in range(0, len(encoded), 64):
        rows.append(predictor.predict_bytes(encoded[start : start + 64], site))
    table = pd.concat(rows, ignore_index=True)
    logger.info("%d images predicted in %.0f s", len(table), time.perf_counter() - started)
    table["sha256"] = [hashlib.sha256(data).hexdigest() for data in encoded]
    table["path"] = [f"{index}:{how}" for index, how in wanted]
    return {member: table.iloc[n] for n, member in enumerate(wanted)}


def measure(model_version: str = "champion", samples: int | None = None, seed: int = 0, site_fraction=0.3) -> dict:
    """The benchmark on a registered version (the local store's, MLFLOW_TRACKING_URI), as bench.record takes it."""
    import mlflow

    from xray.registry import store, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    started = time.perf_counter()
    predictor, info = store.load_predictor(MODEL_NAME, model_version)
    monitoring, evaluate = MonitoringConfig(), EvaluateConfig()
    settings = estimation.Settings(
        samples or evaluate.bootstrap_samples, monitoring.drift_alpha, monitoring.feedback_min_per_class, seed=seed
    )
    references = {str(predictor.version): estimation.Reference.of(predictor.profile, predictor.operating_points)}
    test, adult = test_split(), adults()
    made = periods(test, seed)
    predicted = predict_all(predictor, test, adult, made, seed)
    table, plain = weeks(made, predicted, test, references, settings)
    secondary = site_calibrated(predictor, test, settings, site_fraction) if site_fraction else None
    return summarise(table, plain) | {
        "site_calibrated": secondary,
        "model": info.uri,
        "model_version": str(predictor.version),
        "threshold": predictor.threshold,
        "reference_prevalence": references[str(predictor.version)].prevalence,
        "reference_ood_fraction": references[str(predictor.version)].ood_fraction,
        "samples": settings.samples,
        "seed": seed,
        "images_predicted": len(predicted),
        "seconds": round(time.perf_counter() - started, 1),
    }


def weeks(made: list[dict], predicted: dict, test: pd.DataFrame, references: dict, settings) -> tuple:
    """The periods as one log, a week each in their order (so the calibration test pools each week with the ones
    before it, as it does on a real log): estimated (and plain CBPE) beside realised; both tables, a row a period.
    An image drawn into two weeks is two visits: its key carries the week."""
    logs, labels, names = [], [], {}
    for week, period in enumerate(made):
        table = pd.DataFrame([predicted[m] for m in period["members"]])
        when = FIRST_WEEK + timedelta(weeks=week)
        log = prediction_log.log_rows(table, "batch", "benchmark", now=when)
        log["sha256"] = log["sha256"] + f"-{week}"
        truth = [test["truth"].iloc[i] for i, _ in period["members"] if isinstance(i, int)]
        labelled = log["path"].str.match(r"^\d+:")
        sha = log.loc[labelled, "sha256"]
        labels.append(pd.DataFrame({"sha256": sha, "label": np.where(truth, "PNEUMONIA", "NORMAL")}))
        logs.append(log)
        names[feedback.period_of(pd.Series([when]), "week").iloc[0]] = (period["kind"], period["label"])
    log, labels = pd.concat(logs, ignore_index=True), pd.concat(labels, ignore_index=True)
    labels.attrs["key"] = "sha256"
    realised = feedback.performance(feedback.join(labels, log), settings.samples, settings.seed)
    unadjusted = replace(settings, adjust_prevalence=False)
    both, plain = (
        comparison.side_by_side(estimation.estimate(log, references, "week", used), realised)
        for used in (settings, unadjusted)
    )
    both["kind"], both["label"] = [names[period][0] for period in both["period"]], [names[p][1] for p in both["period"]]
    return both, plain


def site_calibrated(predictor, test: pd.DataFrame, settings, fraction: float) -> dict:
    """Secondary: the test split as a site with its own operating point, fitted as ``--recalibrate-fraction`` fits it
    (``recipes.site_operating_point`` on a patient-grouped ``fraction`` of its images); the prevalence and subgroup
    periods drawn from the other images only, answered at that point."""
    from xray.data.manifest import patient_id
    from xray.evaluation.recipes import grouped_split, site_operating_point

    patients = [f"{kind}:{patient_id(Path(n).name) or n}" for kind, n in zip(test["kind"], test["name"])]
    share = grouped_split(patients, fraction, settings.seed, test["truth"].to_numpy())
    fitted = predict_all(predictor, test, [], [{"members": [(int(i), "original") for i in np.flatnonzero(share)]}], 0)
    p_fit = np.array([fitted[(int(i), "original")]["probability"] for i in np.flatnonzero(share)])
    point = site_operating_point(test["truth"].to_numpy()[share], p_fit, EvaluateConfig())
    predictor.operating_points["kaggle-test"] = point
    references = {str(predictor.version): estimation.Reference.of(predictor.profile, predictor.operating_points)}
    made = periods(test, settings.seed + 1, usable=~share)
    predicted = predict_all(predictor, test, [], made, settings.seed, site="kaggle-test")
    table, plain = weeks(made, predicted, test, references, settings)
    summary = summarise(table, plain)
    return {
        key: summary[key] for key in ("value", "periods", "reliable_periods", "reliable", "by_kind", "per_period")
    } | {
        "plain_cbpe_on_the_reliable_periods": summary["plain_cbpe_on_the_reliable_periods"],
        "calibration_images": int(share.sum()),
        "operating_point": point,
    }


def _errors(table: pd.DataFrame) -> dict:
    """MAE, the realised value inside the estimate's band, and the estimate inside the realised interval."""
    out = {"periods": int(len(table))}
    for name in ("sensitivity", "specificity"):
        known = table[table[name].notna() & table[f"estimated_{name}"].notna()]
        error = (known[f"estimated_{name}"] - known[name]).abs()
        inside = (known[f"{name}_low"] <= known[f"estimated_{name}"]) & (
            known[f"estimated_{name}"] <= known[f"{name}_high"]
        )
        out |= {
            f"mae_{name}": float(error.mean()) if len(known) else None,
            f"max_error_{name}": float(error.max()) if len(known) else None,
            f"coverage_{name}": float(known[f"covered_{name}"].mean()) if len(known) else None,
            f"estimate_in_realised_ci_{name}": float(inside.mean()) if len(known) else None,
        }
    both = [out[f"mae_{n}"] for n in ("sensitivity", "specificity") if out[f"mae_{n}"] is not None]
    cover = [out[f"coverage_{n}"] for n in ("sensitivity", "specificity") if out[f"coverage_{n}"] is not None]
    return out | {"mae": float(np.mean(both)) if both else None, "coverage": float(np.mean(cover)) if cover else None}


def summarise(table: pd.DataFrame, plain: pd.DataFrame) -> dict:
    reliable = table["verdict"] == estimation.RELIABLE
    made_of_shifted = table["kind"].isin(EXPECTED_UNRELIABLE)
    columns = ["kind", "label", "answered", "verdict", "reasons", "estimated_prevalence", "positives", "negatives"]
    for name in ("sensitivity", "specificity", "auc"):
        columns += [
            f"estimated_{name}",
            f"estimated_{name}_low",
            f"estimated_{name}_high",
            name,
            f"{name}_low",
            f"{name}_high",
        ]
    by_kind = {
        kind: {"periods": int(len(rows)), "reliable": int((rows["verdict"] == estimation.RELIABLE).sum())}
        | {k: v for k, v in _errors(rows).items() if k.startswith(("mae_", "coverage_"))}
        for kind, rows in table.groupby("kind", sort=False)
    }
    reliable_errors = _errors(table[reliable])
    return {
        "value": reliable_errors["mae"],
        "unit": "mean absolute error of estimated vs realised sensitivity and specificity, reliable periods",
        "target_mae": 0.05,
        "target_coverage": 0.9,
        "periods": int(len(table)),
        "reliable_periods": int(reliable.sum()),
        "reliable": reliable_errors,
        "unreliable_with_labels": _errors(table[~reliable & table["sensitivity"].notna()]),
        "plain_cbpe_on_the_reliable_periods": _errors(plain[reliable.to_numpy()]),
        "made_of_out_of_scope_or_drifted_images": {
            "periods": int(made_of_shifted.sum()),
            "unreliable": int((made_of_shifted & ~reliable).sum()),
        },
        "by_kind": by_kind,
        "per_period": json.loads(table[columns].to_json(orient="records", double_precision=4)),
    }


@click.command()
@click.option("--model-version", default="champion", show_default=True)
@click.option("--samples", type=int, default=None, help="Draws of the bands (default evaluate.bootstrap_samples).")
@click.option("--seed", default=0, show_default=True, help="Which test images each period draws.")
@click.option(
    "--site-fraction",
    default=0.3,
    show_default=True,
    help="Secondary: test patients for a site's own calibration (0: none).",
)
def main(model_version: str, samples: int | None, seed: int, site_fraction: float) -> None:
    import bench

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = measure(model_version, samples, seed, site_fraction)
    shown = {k: v for k, v in result.items() if k != "per_period"}
    if shown.get("site_calibrated"):
        shown["site_calibrated"] = {k: v for k, v in shown["site_calibrated"].items() if k != "per_period"}
    print(json.dumps(shown, indent=1, default=str))
    command = "python benchmarks/performance_estimation.py " + " ".join(sys.argv[1:])
    bench.record("performance_estimation_mae", result, command)
    bench.record("performance_estimation_coverage", coverage_entry(result), command)


def coverage_entry(result: dict) -> dict:
    """The second key: the share of reliable periods' realised values in the band, with its target (at least 0.9)."""
    coverage = result["reliable"]["coverage"]
    return {"value": coverage, "target": 0.9, "met": coverage is not None and coverage >= 0.9}


if __name__ == "__main__":
    main()
