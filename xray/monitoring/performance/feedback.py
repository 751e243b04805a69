"""Labels back: a site's reads joined to the logged predictions, performance per period, site and version, alerts.

A labels file has a ``label`` column (NORMAL or PNEUMONIA), one key column (``sha256`` of the image bytes, or
``sop_instance_uid`` for DICOM) and optionally ``read_at``. Each label is joined to the latest logged prediction of
that image by each version at each site (a rerun of the same batch does not count twice). A prediction's period is
the UTC day, ISO week or month in which it was made: "this week's patients" are the ones predicted this week.

Sensitivity and specificity count the answers a reader saw: rows with status ``ok``, called PNEUMONIA when the
probability is at least the row's own threshold (the operating point it was answered at). Their 95% intervals are
Wilson score intervals; AUC and ECE (on the same rows) get percentile bootstrap intervals. The shares out of
distribution, out of scope and unreadable are over every labelled prediction of the period.

A period degrades (:func:`degradations`) when

- its sensitivity's upper bound is below ``min_sensitivity``, with at least ``min_per_class`` labelled PNEUMONIA
  answers (sensitivity is computed on them alone: a week of many pneumonias and few normals still alerts), or
- its AUC's upper bound is below the version's test AUC minus the promotion gate's margin, with at least
  ``min_per_class`` labelled answers of each class (AUC needs both).

Both use the upper bound, so a small or noisy period never alerts: only one whose whole interval sits below the line.
Specificity is reported with its interval, and has no alert line of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from xray import CLASS_NAMES
from xray.data.sites import read_labels_file
from xray.errors import DatasetSourceError
from xray.evaluation.calibration import expected_calibration_error
from xray.evaluation.metrics import bootstrap_ci
from xray.monitoring.ood import OUT_OF_DISTRIBUTION, UNREADABLE
from xray.monitoring.scope import OUT_OF_SCOPE

FEEDBACK_KEYS = ("sha256", "sop_instance_uid")
PERIODS = ("day", "week", "month")
GROUP = ["period", "site", "model_version"]
METRICS = ("sensitivity", "specificity", "auc", "ece")


def read_labels(path: Path) -> pd.DataFrame:
    """The labels file, validated: one DatasetSourceError line for anything malformed or an unknown label;
    ``attrs["key"]``, and ``attrs["conflicting"]`` (keys given both labels, left out)."""
    table = read_labels_file(Path(path), f"labels {Path(path).name}", FEEDBACK_KEYS, ("read_at",), conflicts=True)
    if "read_at" in table.columns:
        read_at = pd.to_datetime(table["read_at"].replace("", None), utc=True, errors="coerce", format="mixed")
        bad = read_at.isna() & (table["read_at"] != "")
        if bad.any():
            raise DatasetSourceError(
                f"labels {Path(path).name}: read_at {table['read_at'][bad].iloc[0][:40]!r} is not a date and time "
                f"({int(bad.sum())} such rows); use ISO 8601, e.g. 2026-12-04T09:30:00Z"
            )
        table["read_at"] = read_at
    return table


def period_of(times: pd.Series, period: str) -> pd.Series:
    """The UTC day (2026-12-04), ISO week (2026-W49) or month (2026-12) of each time."""
    times = pd.to_datetime(times, utc=True)
    if period == "day":
        return times.dt.strftime("%Y-%m-%d")
    if period == "week":
        iso = times.dt.isocalendar()
        return iso["year"].astype(int).astype(str) + "-W" + iso["week"].astype(int).astype(str).str.zfill(2)
    if period == "month":
        return times.dt.strftime("%Y-%m")
    raise ValueError(f"period must be one of {PERIODS}, not {period!r}")


@dataclass
class Joined:
    rows: pd.DataFrame
    """One row per (labelled image, version, site): the latest prediction, with ``truth`` (1 = PNEUMONIA)."""
    labels: int
    unmatched: int
    conflicting: int
    key: str
    examples_unmatched: list[str] = field(default_factory=list)

    def counts(self) -> dict:
        return {
            "labels": self.labels,
            "matched_labels": self.labels - self.unmatched,
            "unmatched_labels": self.unmatched,
            "conflicting_labels": self.conflicting,
            "labelled_predictions": len(self.rows),
        }


def join(labels: pd.DataFrame, log: pd.DataFrame, period: str = "week", site: str | None = None) -> Joined:
    """Labels joined to the log (only ``site``'s predictions when given)."""
    key = labels.attrs["key"]
    if site is not None:
        log = log[log["site"] == site]
    logged = log[log[key] != ""].sort_values("time", kind="stable")
    latest = logged.drop_duplicates([key, "model_version", "site"], keep="last")
    rows = latest.merge(labels[[key, "label"]].rename(columns={"label": "truth_label"}), on=key, how="inner")
    rows["truth"] = (rows["truth_label"] == CLASS_NAMES[1]).astype(int)
    rows["period"] = period_of(rows["time"], period)
    unmatched = sorted(set(labels[key]) - set(logged[key]))
    return Joined(
        rows.reset_index(drop=True),
        labels=len(labels),
        unmatched=len(unmatched),
        conflicting=len(labels.attrs.get("conflicting", [])),
        key=key,
        examples_unmatched=unmatched[:3],
    )


def wilson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    if trials == 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(0.5 + confidence / 2))
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def _group(rows: pd.DataFrame, samples: int, seed: int) -> dict:
    answered = rows[rows["status"] == "ok"]
    y = answered["truth"].to_numpy()
    p = answered["probability"].to_numpy(float)
    called = p >= answered["threshold"].to_numpy(float)
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    tp, tn = int((called & (y == 1)).sum()), int((~called & (y == 0)).sum())
    result = {
        "labelled": len(rows),
        "answered": len(answered),
        "positives": positives,
        "negatives": negatives,
        "share_out_of_distribution": float((rows["status"] == OUT_OF_DISTRIBUTION).mean()),
        "share_out_of_scope": float((rows["status"] == OUT_OF_SCOPE).mean()),
        "share_unreadable": float((rows["status"] == UNREADABLE).mean()),
    }
    for name, hits, trials in (("sensitivity", tp, positives), ("specificity", tn, negatives)):
        low, high = wilson(hits, trials)
        result |= {name: hits / trials if trials else float("nan"), f"{name}_low": low, f"{name}_high": high}
    result |= dict.fromkeys(("auc", "auc_low", "auc_high", "ece", "ece_low", "ece_high"), float("nan"))
    if positives and negatives:
        # The threshold is per row (a site's operating point); the interval only needs AUC and ECE.
        interval = bootstrap_ci(y, p, (0.5,), samples, seed)[0]
        result |= {"auc": float(roc_auc_score(y, p)), "auc_low": interval["auc"][0], "auc_high": interval["auc"][1]}
        result |= {
            "ece": expected_calibration_error(y, p),
            "ece_low": interval["ece"][0],
            "ece_high": interval["ece"][1],
        }
    return result


def performance(joined: Joined, samples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per period, site and version, in time order: counts, metrics and their 95% intervals, shares."""
    rows = [
        dict(zip(GROUP, keys)) | _group(group, samples, seed) for keys, group in joined.rows.groupby(GROUP, sort=True)
    ]
    columns = ["labelled", "answered", "positives", "negatives"]
    columns += [f"{m}{s}" for m in METRICS for s in ("", "_low", "_high")]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=[*GROUP, *columns])


def degradations(
    table: pd.DataFrame, min_sensitivity: float, test_auc: dict[str, float], margin: float, min_per_class: int
) -> list[str]:
    """One line per degraded metric of a period, site and version (module docstring); ``test_auc``: by version;
    ``min_per_class``: labelled answers of each class a metric is computed on, at least."""
    lines = []
    for row in table.itertuples(index=False):
        where = f"period {row.period}, site {row.site or '(none)'}, v{row.model_version}"
        if row.positives >= min_per_class and row.sensitivity_high < min_sensitivity:
            lines.append(
                f"sensitivity degraded in {where}: {row.sensitivity:.3f} (95% CI {row.sensitivity_low:.3f}-"
                f"{row.sensitivity_high:.3f}, {row.positives} PNEUMONIA) is below evaluate.min_sensitivity "
                f"{min_sensitivity:g}"
            )
        floor = test_auc.get(str(row.model_version))
        both = min(row.positives, row.negatives) >= min_per_class
        if both and floor is not None and not np.isnan(row.auc_high) and row.auc_high < floor - margin:
            lines.append(
                f"AUC degraded in {where}: {row.auc:.3f} (95% CI {row.auc_low:.3f}-{row.auc_high:.3f}) is below the "
                f"version's test AUC {floor:.3f} minus the gate's margin {margin:g}"
            )
    return lines


def export_sources(rows: pd.DataFrame, key: str) -> tuple[dict[str, pd.DataFrame], int]:
    """The labelled images of batch runs (``rows``: :attr:`Joined.rows`) as training sources (data.sources): per input URI a labels table keyed by
    ``sop_instance_uid`` when every row has one, else by file name; and how many labelled predictions have no
    stored image (serving requests), which cannot be exported."""
    labelled = rows.drop_duplicates([key, "input"])
    stored = labelled[(labelled["source"] == "batch") & (labelled["input"] != "")]
    sources = {}
    for uri, group in stored.groupby("input", sort=True):
        if (group["sop_instance_uid"] != "").all():
            table = group[["sop_instance_uid", "truth_label"]]
        else:
            table = pd.DataFrame({"file": group["path"], "truth_label": group["truth_label"]})
        sources[uri] = table.rename(columns={"truth_label": "label"}).drop_duplicates().reset_index(drop=True)
    without_image = int(((rows["source"] != "batch") | (rows["input"] == "")).sum())
    return sources, without_image
