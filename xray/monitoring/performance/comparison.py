"""The estimate where it shows: beside the realised metrics once labels exist, in alerts, MLflow metrics and lines.

- :func:`side_by_side`: per period, site and version, the estimate (``estimated_*`` with its band, the verdict) and
  the realised metrics of :func:`feedback.performance` (with their intervals), and whether each realised value lies
  in the estimate's band (``covered_*``);
- :func:`degradations`: feedback's alert rules applied to a **reliable** estimate, each line starting with
  "estimated": its sensitivity's upper bound below ``evaluate.min_sensitivity``, or its AUC's upper bound below the
  version's test AUC minus the gate's margin. An unreliable estimate never alerts;
- :func:`metrics`: the MLflow metrics ``estimated_<metric>[_low|_high]`` and ``estimated_reliable``, one series per
  site, version and subgroup, the period as the step;
- :func:`lines`: one printable line per period, site, version (and subgroup).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from xray.monitoring.performance.estimation import COMPARED, ESTIMATED, RELIABLE
from xray.monitoring.performance.feedback import GROUP


def side_by_side(estimated: pd.DataFrame, realised: pd.DataFrame) -> pd.DataFrame:
    """Every estimated group (subgroup ``""`` only: feedback has no subgroups) with the realised metrics of the
    same period, site and version beside it (NaN where no label came back; a column both tables have, such as
    ``answered``, is ``realised_<name>`` on feedback's side), and ``covered_<metric>``: whether the realised value
    lies in the estimate's band (NaN without a realised value)."""
    whole = estimated[estimated["subgroup"] == ""] if "subgroup" in estimated.columns else estimated
    # Counts and shares both have (answered, the shares) are the labelled predictions' on feedback's side.
    overlap = {c: f"realised_{c}" for c in realised.columns if c in whole.columns and c not in GROUP}
    table = whole.merge(realised.rename(columns=overlap), on=GROUP, how="left", validate="one_to_one")
    for name in COMPARED:
        if name not in table.columns:
            table[name] = np.nan
        inside = (table[f"estimated_{name}_low"] <= table[name]) & (table[name] <= table[f"estimated_{name}_high"])
        table[f"covered_{name}"] = inside.astype(float).where(table[name].notna())
    return table.sort_values(GROUP, kind="stable").reset_index(drop=True)


def _where(row) -> str:
    subgroup = f", {row.subgroup}" if getattr(row, "subgroup", "") else ""
    return f"period {row.period}, site {row.site or '(none)'}, v{row.model_version}{subgroup}"


def degradations(table: pd.DataFrame, min_sensitivity: float, test_auc: dict[str, float], margin: float) -> list[str]:
    """One line per reliable estimate that degrades (module docstring); ``test_auc``: by version."""
    lines = []
    for row in table[table["verdict"] == RELIABLE].itertuples(index=False):
        where = _where(row)
        if row.estimated_sensitivity_high < min_sensitivity:
            lines.append(
                f"estimated sensitivity degraded in {where}: {row.estimated_sensitivity:.3f} (95% band "
                f"{row.estimated_sensitivity_low:.3f}-{row.estimated_sensitivity_high:.3f}, {row.answered} answers, "
                f"no labels yet) is below evaluate.min_sensitivity {min_sensitivity:g}"
            )
        floor = test_auc.get(str(row.model_version))
        if floor is not None and row.estimated_auc_high < floor - margin:
            lines.append(
                f"estimated AUC degraded in {where}: {row.estimated_auc:.3f} (95% band {row.estimated_auc_low:.3f}-"
                f"{row.estimated_auc_high:.3f}, no labels yet) is below the version's test AUC {floor:.3f} minus "
                f"the gate's margin {margin:g}"
            )
    return lines


def step_of(period: str) -> int:
    """An MLflow step for a period: its digits (2026-W49 -> 202649, 2026-12 -> 202612, 2026-12-04 -> 20261204)."""
    return int(re.sub(r"\D", "", str(period)) or 0)


def series_of(row) -> str:
    """The name of a group's series (MLflow allows letters, digits, ``_-./`` and spaces): ``<site>/v<version>``, plus
    ``/<subgroup>``."""
    parts = [row.site or "no-site", f"v{row.model_version}"] + ([row.subgroup] if getattr(row, "subgroup", "") else [])
    return re.sub(r"[^A-Za-z0-9_./ -]+", "-", "/".join(parts))


def metrics(table: pd.DataFrame) -> list[tuple[str, float, int]]:
    """(key, value, step) of every finite estimate: ``estimated_<metric>/<series>`` with ``_low`` and ``_high``,
    ``estimated_reliable/<series>`` (1 or 0) and ``estimated_answered/<series>``; the step is the period's."""
    logged = []
    for row in table.itertuples(index=False):
        series, step = series_of(row), step_of(row.period)
        values = {
            f"estimated_{m}{s}": getattr(row, f"estimated_{m}{s}") for m in ESTIMATED for s in ("", "_low", "_high")
        }
        values |= {"estimated_reliable": float(row.verdict == RELIABLE), "estimated_answered": float(row.answered)}
        logged += [(f"{key}/{series}", float(v), step) for key, v in values.items() if np.isfinite(v)]
    return logged


def lines(table: pd.DataFrame) -> list[str]:
    """One line per group: the estimates with their bands, then the verdict and its reasons."""
    out = []
    for row in table.itertuples(index=False):
        shown = []
        for name in ("sensitivity", "specificity", "ppv", "npv", "auc", "prevalence"):
            value = getattr(row, f"estimated_{name}")
            if np.isfinite(value):
                low, high = getattr(row, f"estimated_{name}_low"), getattr(row, f"estimated_{name}_high")
                shown.append(f"{name} {value:.3f} ({low:.3f}-{high:.3f})")
        verdict = row.verdict + (f": {row.reasons}" if row.reasons else "")
        out.append(f"{_where(row)}: {row.answered} answered; {', '.join(shown) or 'no estimate'}; {verdict}")
    return out


def summary(table: pd.DataFrame, alerts: list[str]) -> dict:
    """The keys a summary of the estimate carries (monitor --from-log, feedback): counts, alerts, and every group (an
    undefined estimate ``None``)."""
    estimates = [f"estimated_{m}{s}" for m in ESTIMATED for s in ("", "_low", "_high")]
    columns = [*GROUP, "subgroup", "answered", *estimates, "verdict", "reasons"]
    return {
        "estimated_groups": int(len(table)),
        "estimated_reliable": int((table["verdict"] == RELIABLE).sum()) if len(table) else 0,
        "estimated_unreliable": int((table["verdict"] != RELIABLE).sum()) if len(table) else 0,
        "estimated_alerts": alerts,
        "estimates": _records(table[[c for c in columns if c in table.columns]]),
    }


def _records(table: pd.DataFrame) -> list[dict]:
    """Rows as JSON takes them: an undefined estimate (NaN) is ``None`` (``null``)."""
    return table.astype(object).where(table.notna(), None).to_dict("records")
