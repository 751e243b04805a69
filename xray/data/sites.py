"""Labelled sites: another hospital's images with NORMAL/ and PNEUMONIA/ folders, for evaluation and the gate.

A site arrives as a zip (local, file:// or s3://) or a folder; the folders may sit at any depth. It goes through the
same checks as the training archive: safe extraction with the zip-bomb limits, a full decode of every image, the
bad-image budget, and duplicates removed.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from xray import CLASS_NAMES
from xray.config import DataConfig, S3Config
from xray.data.dataset import ValidatedDataset
from xray.data.manifest import build_manifest, check_bad_fraction
from xray.errors import DatasetSourceError
from xray.storage.archive import copy_labelled, extract_labelled
from xray.storage.fetch import fetch
from xray.storage.s3 import local_path


def site_name(uri: str, name: str | None = None) -> str:
    """A short name for tags and tables: the given one, else the archive's or folder's stem."""
    raw = name or PurePosixPath(uri.rstrip("/")).name.removesuffix(".zip") or "site"
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-")
    if not cleaned:
        raise DatasetSourceError(f"site name {raw!r} has no letters or digits")
    return cleaned[:64]


def load_site(uri: str, workdir: Path, data: DataConfig, s3: S3Config) -> tuple[ValidatedDataset, dict]:
    """(dataset with split ``site``, report): every readable image under a NORMAL/ or PNEUMONIA/ folder of ``uri``."""
    workdir.mkdir(parents=True, exist_ok=True)
    images = workdir / "images"
    local = local_path(uri)
    if local is not None and local.is_dir():
        extraction = copy_labelled(local, images, data.limits)
        fetched = {"source_uri": str(local), "sha256": None}
    else:
        archive = fetch(uri, workdir / "download", s3)
        extraction = extract_labelled(archive.path, images, data.limits)
        fetched = {"source_uri": archive.source_uri, "sha256": archive.sha256}
    manifest, quarantined, converted = build_manifest(images, extraction.files)
    check_bad_fraction(len(extraction.files), quarantined, data.max_bad_fraction)
    duplicated = manifest.duplicated("sha256", keep="first").to_numpy()
    conflicting = int(manifest.groupby("sha256")["label"].nunique().gt(1).sum())
    for relative in manifest.loc[duplicated, "path"]:
        (images / relative).unlink(missing_ok=True)
    manifest = manifest.loc[~duplicated].reset_index(drop=True)
    counts = {label: int((manifest["label"] == label).sum()) for label in CLASS_NAMES}
    report = fetched | {
        "counts": counts,
        "images": int(len(manifest)),
        "quarantined": quarantined,
        "converted": converted,
        "duplicates_removed": int(duplicated.sum()),
        "duplicates_with_both_labels": conflicting,
        "ignored_files": extraction.ignored,
        "junk_files": extraction.junk,
        "patients": int(manifest["patient_id"].nunique()),
    }
    return ValidatedDataset(images, manifest), report
