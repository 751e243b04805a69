"""The manifest: one row per validated image, and the rules that shape the splits.

Columns: path (relative to the dataset root), split, label, patient_id (from a Kermany file name, the keyed hash of
a DICOM PatientID, else ``image:<path>``), sha256, width, height, channels, format, source_split, site (the source's
name, data.sources), sop_instance_uid and the subgroups (age_band, sex, view, manufacturer: a DICOM image's header;
empty otherwise). A DICOM image is
stored as the PNG of its display pixels (the model's input), so training and evaluation read it like any image.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from xray import CLASS_NAMES, SPLITS
from xray.data.images import check_image
from xray.errors import DataQualityError

SUBGROUPS = ("age_band", "sex", "view", "manufacturer")
"""What a DICOM header says about an image, kept for metrics by subgroup (empty for JPEG and PNG)."""
AGE_BANDS = ((1, "under 1"), (3, "1-2"), (6, "3-5"), (18, "6-17"), (float("inf"), "18 and over"))


def age_band(years: float | None) -> str:
    """The band of an age in years (completed years: 1-2 holds 1.0 to 2.99)."""
    if years is None:
        return ""
    return next(name for limit, name in AGE_BANDS if years < limit)


def subgroups_of(header) -> dict[str, str]:
    if header is None:
        return dict.fromkeys(SUBGROUPS, "")
    return {
        "age_band": age_band(header.age_years),
        "sex": header.sex,
        "view": header.view_position,
        "manufacturer": header.manufacturer,
    }


def subgroups_in(rows: pd.DataFrame):
    """(subgroup, value, mask over ``rows``) for every non-empty value of each subgroup column ``rows`` has."""
    for name in SUBGROUPS:
        if name not in rows:
            continue
        values = rows[name].fillna("").to_numpy(dtype=object)
        for value in sorted({v for v in values if v}):
            yield name, value, values == value


COLUMNS = [
    "path",
    "split",
    "label",
    "patient_id",
    "sha256",
    "width",
    "height",
    "channels",
    "format",
    "source_split",
    "site",
    "sop_instance_uid",
    *SUBGROUPS,
]
# Evaluation splits win: a duplicate is dropped from the lower-priority split.
SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE),
)


def patient_id(filename: str) -> str | None:
    """Patient id from a Kermany file name, or None when it has no known pattern."""
    stem = Path(filename).stem
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(1).lower()
    return None


@dataclass
class DataReport:
    counts: dict[str, dict[str, int]]
    junk_files: int
    ignored_entries: int
    quarantined: list[dict[str, str]]
    converted: int
    duplicates_within_split: int
    duplicates_across_splits: int
    duplicates_removed: list[dict[str, str]]
    patients_in_train_and_test: int
    unparsed_patient_ids: int
    val_source: str
    archive_root: str = "."
    notes: list[str] = field(default_factory=list)
    patients_in_train_and_val: int | None = None
    """Counted on the final splits; None only in reports written before it was counted."""
    sites: dict[str, dict] = field(default_factory=dict)
    """Per source (data.sources): uri, digest, where its splits come from, counts per split and class."""
    duplicates_across_sources: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def build_manifest(
    root: Path, files: list[tuple[str, str, str]], site: str = ""
) -> tuple[pd.DataFrame, list[dict[str, str]], int]:
    """Decode every image under ``root``; return (manifest, quarantined, converted).

    Files that cannot be decoded are removed from ``root`` and listed; images
    in formats or modes the model input cannot take as they are get a PNG copy.
    """
    rows, quarantined, converted = [], [], 0
    for split, label, relative in files:
        path = root / relative
        data = path.read_bytes()
        check = check_image(data)
        if not check.ok:
            quarantined.append({"path": relative, "split": split, "label": label, "reason": check.reason})
            path.unlink()
            continue
        pid = patient_id(path.name)
        if check.converted is not None:
            converted += 1
            path.unlink()
            # The whole name plus .png: "a.tif" and "a.bmp", or the extension-less DICOM files "1.2.3.4" and
            # "1.2.3.5", must not become one file.
            path = path.with_name(path.name + ".png")
            path.write_bytes(check.converted)
            relative = path.relative_to(root).as_posix()
        if check.header is not None and check.header.patient:
            # A DICOM image's patient is its keyed PatientID hash (xray.data.dicom.patient_hash), whatever its name.
            patient = f"dicom:{check.header.patient}"
        else:
            patient = f"{label.lower() or 'name'}:{pid}" if pid else None
        rows.append(
            {
                "path": relative,
                "split": split,
                "label": label,
                "patient_id": patient,
                "sha256": hashlib.sha256(data).hexdigest(),
                "width": check.width,
                "height": check.height,
                "channels": check.channels,
                "format": check.format,
                "source_split": split,
                "site": site,
                "sop_instance_uid": check.header.sop_instance_uid if check.header is not None else "",
                **subgroups_of(check.header),
            }
        )
    manifest = pd.DataFrame(rows, columns=COLUMNS)
    unparsed = manifest["patient_id"].isna()
    # An image whose name carries no patient id is its own group, so it can never leak.
    manifest.loc[unparsed, "patient_id"] = "image:" + manifest.loc[unparsed, "path"]
    return manifest, quarantined, converted


def check_bad_fraction(total: int, quarantined: list[dict[str, str]], max_bad_fraction: float) -> None:
    if total and len(quarantined) / total > max_bad_fraction:
        examples = ", ".join(f"{q['path']} ({q['reason']})" for q in quarantined[:3])
        raise DataQualityError(
            f"{len(quarantined)} of {total} images failed to decode "
            f"({len(quarantined) / total:.1%} > max_bad_fraction={max_bad_fraction:.1%}); e.g. {examples}"
        )


def remove_cross_split_duplicates(manifest: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, str]], int, int]:
    """Drop copies of an evaluation image from the lower-priority splits.

    Returns (manifest, removed rows, duplicate groups within a split, groups across splits).
    """
    within = int(manifest.groupby(["sha256", "split"]).size().gt(1).sum())
    splits_per_hash = manifest.groupby("sha256")["split"].nunique()
    across_hashes = set(splits_per_hash[splits_per_hash > 1].index)
    priority = manifest["split"].map(SPLIT_PRIORITY)
    best = priority.groupby(manifest["sha256"]).transform("min")
    drop = manifest["sha256"].isin(across_hashes) & (priority > best)
    removed = manifest.loc[drop, ["path", "split", "label", "sha256"]].to_dict("records")
    return manifest.loc[~drop].reset_index(drop=True), removed, within, len(across_hashes)


def needs_val_split(manifest: pd.DataFrame, min_val_per_class: int) -> bool:
    val = manifest[manifest["split"] == "val"]
    return any((val["label"] == label).sum() < min_val_per_class for label in CLASS_NAMES)


def carve_val(manifest: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Move whole patients from train to val, per label, until val_fraction of images.

    Stratified by label and grouped by patient, so no patient is in both
    train and val. A too-small existing val is merged back into train first.
    """
    manifest = manifest.copy()
    manifest.loc[manifest["split"] == "val", "split"] = "train"
    rng = np.random.default_rng(seed)
    for label in CLASS_NAMES:
        pool = manifest[(manifest["split"] == "train") & (manifest["label"] == label)]
        sizes = pool.groupby("patient_id").size()
        order = sizes.index.to_numpy()[rng.permutation(len(sizes))]
        target = int(round(val_fraction * len(pool)))
        cumulative = sizes.loc[order].cumsum().to_numpy()
        chosen = order[: int(np.searchsorted(cumulative, target) + 1)] if target else []
        moving = manifest["patient_id"].isin(chosen) & (manifest["label"] == label) & (manifest["split"] == "train")
        manifest.loc[moving, "split"] = "val"
    return manifest


def split_counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    return {
        split: {
            label: int(((manifest["split"] == split) & (manifest["label"] == label)).sum()) for label in CLASS_NAMES
        }
        for split in SPLITS
    }


def patient_overlap(manifest: pd.DataFrame, a: str, b: str) -> int:
    patients = [set(manifest.loc[manifest["split"] == s, "patient_id"]) for s in (a, b)]
    return len(patients[0] & patients[1])


def sample(manifest: pd.DataFrame, split: str, per_class: int | None, seed: int) -> pd.DataFrame:
    """At most ``per_class`` rows of each label from one split (all when None)."""
    rows = manifest[manifest["split"] == split]
    if per_class is None:
        return rows.reset_index(drop=True)
    # Per site and label, so that every source keeps images in a capped (smoke) run.
    keys = ["site", "label"] if "site" in rows and rows["site"].nunique() > 1 else "label"
    parts = [group.sample(n=min(per_class, len(group)), random_state=seed) for _, group in rows.groupby(keys)]
    return pd.concat(parts).sort_values("path").reset_index(drop=True)


def split_key(row_patient: str, sha256: str) -> str:
    """What a stable split hashes: the patient, or the image's content when no patient is known (a renamed or moved
    file keeps its split)."""
    return f"sha256:{sha256}" if row_patient.startswith("image:") else row_patient


def stable_splits(manifest: pd.DataFrame, site: str, val: float, test: float, key: str) -> pd.Series:
    """train/val/test per row by a keyed hash of (site, patient): HMAC-SHA256 under ``key`` read as a number in [0, 1),
    below ``1 - val - test`` train, then val, then test. A patient's split depends on nothing else, so as a site's
    data grows no earlier patient moves, and no test patient ever reaches train."""
    secret = key.encode()

    def split_of(group: str) -> str:
        digest = hmac.new(secret, f"{site}\0{group}".encode(), hashlib.sha256).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        return "train" if u < 1 - val - test else "val" if u < 1 - test else "test"

    groups = [split_key(p, h) for p, h in zip(manifest["patient_id"], manifest["sha256"])]
    return pd.Series([split_of(group) for group in groups], index=manifest.index, dtype=object)


def site_counts(manifest: pd.DataFrame) -> dict[str, dict[str, dict[str, int]]]:
    """{site: {split: {label: images}}}."""
    return {site: split_counts(rows) for site, rows in manifest.groupby("site", sort=False)}
