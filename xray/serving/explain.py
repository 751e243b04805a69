"""Which predictions to explain with Grad-CAM, and how each explanation is named and captioned.

Not the first N files of a batch (in the case a user tried, all NORMAL): the most confident PNEUMONIA calls and the
calls nearest the threshold, chosen from candidates kept in bounded memory while the batch streams.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

from xray import CLASS_NAMES
from xray.monitoring.ood import OK, UNREADABLE
from xray.storage.listing import ImageRef

MOST_CONFIDENT, NEAREST = "most confident PNEUMONIA", "nearest the threshold"


def _ranked(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(PNEUMONIA calls with status ok by falling probability, readable rows by rising distance to the threshold)."""
    readable = table[table["status"] != UNREADABLE]
    margin = (readable["probability"].astype(float) - readable["threshold"].astype(float)).abs()
    positives = readable[(readable["status"] == OK) & (readable["label"] == CLASS_NAMES[1])]
    confident = positives.sort_values("probability", ascending=False, kind="stable")
    return confident, readable.iloc[np.argsort(margin.to_numpy(), kind="stable")]


def candidates_to_explain(table: pd.DataFrame, count: int) -> pd.DataFrame:
    """The top ``count`` rows of each group: what :func:`choose_to_explain` can pick from, bounded."""
    confident, nearest = _ranked(table)
    return pd.concat([confident.head(count), nearest.head(count)]).drop_duplicates("path")


def choose_to_explain(table: pd.DataFrame, count: int) -> list[dict]:
    """The ``count`` rows most worth a Grad-CAM look: half (rounded up) the most confident PNEUMONIA calls with status
    ok, the rest those nearest the threshold (any readable status: the calls a reader most needs explained), each
    image once; the nearest fill in when there are fewer confident calls (the nearest cover every readable row, so
    nothing else is needed when they run short). Each row gains ``why``."""
    confident, nearest = _ranked(table)
    chosen: dict[str, str] = {}
    for frame, why, quota in ((confident, MOST_CONFIDENT, (count + 1) // 2), (nearest, NEAREST, count)):
        taken = 0
        for path in frame["path"]:
            if len(chosen) >= count or taken >= quota:
                break
            if path not in chosen:
                chosen[path], taken = why, taken + 1
    rows = table.drop_duplicates("path").set_index("path")
    return [
        {
            "path": path,
            "sha256": str(rows.at[path, "sha256"] or ""),
            "probability": float(rows.at[path, "probability"]),
            "threshold": float(rows.at[path, "threshold"]),
            "label": str(rows.at[path, "label"] or ""),
            "status": str(rows.at[path, "status"]),
            "why": why,
        }
        for path, why in chosen.items()
    ]


def explanation_name(rank: int, row: dict) -> str:
    """A file name unique per input: rank, the input's own name and the start of its content hash."""
    stem = PurePosixPath(str(row["path"]).split("!")[-1]).stem[:40] or "image"
    return f"gradcam_{rank:02d}_{stem}_{str(row.get('sha256') or '')[:8]}.png"


def explanation_caption(row: dict) -> str:
    """File, probability against the threshold, the call (or the status when there is none), why it was chosen."""
    verdict = row["label"] or str(row["status"]).replace("_", " ")
    return (
        f"{PurePosixPath(str(row['path']).split('!')[-1]).name[:48]}\n"
        f"P(PNEUMONIA) {float(row['probability']):.3f}, threshold {float(row['threshold']):.3f}: {verdict}\n"
        f"{row['why']}"
    )


def read_chosen(refs: Iterable[ImageRef], names: set[str]) -> dict[str, bytes]:
    """The bytes of the listed files named in ``names``; every other file is listed, not read."""
    found = {}
    for ref in refs:
        if ref.name in names:
            found[ref.name] = ref.read()
            if len(found) == len(names):
                break
    return found
