"""The validated dataset: images on disk plus the manifest that describes them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from xray.config.data import DataConfig
from xray.data.manifest import (
    SPLIT_PRIORITY,
    DataReport,
    build_manifest,
    carve_val,
    check_bad_fraction,
    needs_val_split,
    patient_overlap,
    remove_cross_split_duplicates,
    site_counts,
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
    """Extract safely, decode everything, de-duplicate and shape the splits (the dataset archive: site
    ``config.base_site``)."""
    extraction = extract(archive, workdir, config.limits)
    manifest, quarantined, converted = build_manifest(workdir, extraction.files, config.base_site)
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
        sites={
            config.base_site: {
                "site": config.base_site,
                "splits_from": "the archive's own train/ and test/ folders; val " + val_source,
                "counts": split_counts(manifest),
            }
        },
    )
    return ValidatedDataset(workdir, manifest), report


def add_sources(dataset: ValidatedDataset, report: DataReport, sources: list[tuple[pd.DataFrame, dict]]) -> None:
    """Join the other sources' rows (:func:`xray.data.sites.load_source`, files already under ``dataset.root``) to the
    dataset archive's, in place. An image (by SHA-256) that more than one source holds is kept once: in its
    highest-priority split (test, val, train), and there in the earliest source of data.sources."""
    if not sources:
        return
    base = next(iter(report.sites))
    order = {site: index for index, site in enumerate([base, *(r["site"] for _, r in sources)])}
    manifest = pd.concat([dataset.manifest, *(rows for rows, _ in sources)], ignore_index=True)
    rank = manifest["split"].map(SPLIT_PRIORITY) * len(order) + manifest["site"].map(order)
    best = rank.groupby(manifest["sha256"]).transform("min")
    first = ~manifest.assign(rank=rank).duplicated(["sha256", "rank"], keep="first")
    in_several = manifest.groupby("sha256")["site"].transform("nunique") > 1
    drop = in_several & ((rank > best) | ~first)
    for relative in manifest.loc[drop, "path"]:
        (dataset.root / relative).unlink(missing_ok=True)
    dropped = manifest.loc[drop]
    dataset.manifest = manifest.loc[~drop].reset_index(drop=True)
    report.counts = split_counts(dataset.manifest)
    report.duplicates_across_sources = int(dropped["sha256"].nunique())
    report.duplicates_removed = report.duplicates_removed + dropped[["path", "split", "label", "sha256"]].to_dict(
        "records"
    )
    report.patients_in_train_and_test = patient_overlap(dataset.manifest, "train", "test")
    report.patients_in_train_and_val = patient_overlap(dataset.manifest, "train", "val")
    report.unparsed_patient_ids = int(dataset.manifest["patient_id"].str.startswith("image:").sum())
    counts = site_counts(dataset.manifest)
    for _, source in sources:
        source["counts"] = counts.get(source["site"], source["counts"])
        source["duplicates_in_earlier_sources"] = int((dropped["site"] == source["site"]).sum())
        report.sites[source["site"]] = source
    report.sites[base]["counts"] = counts.get(base, {})


def fingerprint(manifest: pd.DataFrame) -> str:
    """Identifies the dataset by content: each row carries its image's sha256."""
    return hashlib.sha256(manifest.to_csv(index=False).encode()).hexdigest()
