"""The validated dataset: images on disk plus the manifest that describes them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from xray.config import DataConfig
from xray.data.manifest import (
    DataReport,
    build_manifest,
    carve_val,
    check_bad_fraction,
    needs_val_split,
    patient_overlap,
    remove_cross_split_duplicates,
    split_counts,
)
from xray.storage.archive import extract


@dataclass
class ValidatedDataset:
    """Images under ``root`` at the manifest's relative ``path``s.

    ``root`` is a local directory on whichever machine loaded the artifact;
    the materializer packs it into the artifact store, never passes the path.
    """

    root: Path
    manifest: pd.DataFrame

    def paths(self, rows: pd.DataFrame) -> list[str]:
        return [str(self.root / p) for p in rows["path"]]


def prepare_dataset(archive: Path, workdir: Path, config: DataConfig, seed: int) -> tuple[ValidatedDataset, DataReport]:
    """Extract safely, decode everything, de-duplicate and shape the splits."""
    extraction = extract(archive, workdir, config.limits)
    manifest, quarantined, converted = build_manifest(workdir, extraction.files)
    check_bad_fraction(len(extraction.files), quarantined, config.max_bad_fraction)
    manifest, removed, within, across = remove_cross_split_duplicates(manifest)
    if needs_val_split(manifest, config.min_val_per_class):
        had_val = bool((manifest["split"] == "val").any())
        manifest = carve_val(manifest, config.val_fraction, seed)
        val_source = f"carved from train ({config.val_fraction:.0%} of images per class, grouped by patient)" + (
            "; the archive's val split was too small and was merged into train first" if had_val else ""
        )
    else:
        val_source = "archive"
    for item in removed:
        (workdir / item["path"]).unlink(missing_ok=True)
    report = DataReport(
        counts=split_counts(manifest),
        junk_files=extraction.junk,
        ignored_entries=extraction.ignored,
        quarantined=quarantined,
        converted=converted,
        duplicates_within_split=within,
        duplicates_across_splits=across,
        duplicates_removed=removed,
        patients_in_train_and_test=patient_overlap(manifest, "train", "test"),
        patients_in_train_and_val=patient_overlap(manifest, "train", "val"),
        unparsed_patient_ids=int(manifest["patient_id"].str.startswith("image:").sum()),
        val_source=val_source,
        archive_root=extraction.root,
    )
    return ValidatedDataset(workdir, manifest), report


def fingerprint(manifest: pd.DataFrame) -> str:
    """Identifies the dataset by content: each row carries its image's sha256."""
    return hashlib.sha256(manifest.to_csv(index=False).encode()).hexdigest()
