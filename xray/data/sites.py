"""Labelled sites: another hospital's images, for evaluation and the gate (:func:`load_site`) and as a training
source (:func:`load_source`, ``data.sources``).

A site arrives as a zip (local, file:// or s3://) or a folder; labels come from NORMAL/ and PNEUMONIA/ folders at any
depth or, for a training source, from a labels CSV. It goes through the same checks as the training archive: safe
extraction with the zip-bomb limits, a full decode of every image, the bad-image budget, and duplicates removed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from xray import CLASS_NAMES, SPLITS
from xray.config.data import DataConfig, SourceConfig
from xray.config.s3 import S3Config
from xray.data.dataset import ValidatedDataset
from xray.data.dicom import PATIENT_KEY_ENV
from xray.data.manifest import (
    build_manifest,
    carve_val,
    check_bad_fraction,
    needs_val_split,
    split_counts,
    stable_splits,
)
from xray.errors import ConfigError, DatasetSourceError, XrayError
from xray.storage import s3 as s3_storage
from xray.storage.archive import copy_labelled, copy_tree, extract_labelled, extract_tree, is_junk
from xray.storage.fetch import fetch, locate
from xray.storage.listing import copy_prefix, is_s3_prefix, prefix_digest
from xray.storage.s3 import local_path

logger = logging.getLogger(__name__)


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


# -- training sources (data.sources) -------------------------------------------------------------------------------

MAX_LABELS_BYTES = 64 * 1024**2
LABEL_KEYS = ("file", "sop_instance_uid")


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and content (junk and symlinks left out, as when it is copied)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if not p.is_symlink() and p.is_file()):
        name = file.relative_to(folder).as_posix()
        if is_junk(name):
            continue
        digest.update(f"{name}\0{s3_storage.sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _object_identity(uri: str, s3: S3Config) -> dict:
    """A zip's or a CSV's identity (:func:`xray.storage.fetch.locate`) and content digest: a local file's SHA-256; an S3
    object's stored SHA-256, else its ETag and size."""
    identity = locate(uri, s3)
    return identity | {"digest": identity.get("sha256") or f"etag:{identity['etag']}:{identity['size']}"}


def identify_source(source: SourceConfig, s3: S3Config) -> dict:
    """What a source is now, without extracting it: ``digest`` identifies its images and labels by content, so equal
    digests mean the same training data (``--if-changed``, and the prepare step's cache key)."""
    try:
        local = local_path(source.uri)
        if local is not None and local.is_dir():
            images = {"digest": folder_digest(local)}
        elif is_s3_prefix(source.uri):
            images = {"digest": prefix_digest(source.uri, s3.max_attempts)}
        else:
            images = _object_identity(source.uri, s3)
        labels = _object_identity(source.labels, s3) if source.labels else {"digest": ""}
    except XrayError as error:
        raise DatasetSourceError(f"source {source.site} ({source.uri}): {error}") from None
    return {
        "site": source.site,
        "uri": source.uri,
        "labels": source.labels or "",
        "digest": hashlib.sha256(f"{images['digest']}\n{labels['digest']}".encode()).hexdigest(),
        "images": images,
        "labels_identity": labels,
    }


@dataclass
class SourceIdentities:
    """What each training source of ``data.sources`` is now (:func:`identify_source`, by site): a ZenML artifact, the
    prepare step is cached on it."""

    sources: dict[str, dict] = field(default_factory=dict)


def identify_sources(data: DataConfig, s3: S3Config) -> SourceIdentities:
    return SourceIdentities({source.site: identify_source(source, s3) for source in data.extra_sources})


def changed_sources(archive: dict, sources: SourceIdentities, base_site: str, recorded: dict) -> tuple[dict, list]:
    """ "Has any training source changed since a version was trained?": ({site: content digest now}, the sites whose
    digest differs from ``recorded``, the version's ``training_data``). ``archive``: the dataset archive's identity
    (:func:`xray.storage.fetch.locate`); an S3 object known by its ETag alone keeps the digest recorded for that
    ETag (the same object the version was trained on)."""
    digests = {base_site: archive.get("sha256") or ""}
    etag = archive.get("etag")
    if not digests[base_site] and etag and etag == recorded.get("etags", {}).get(base_site):
        digests[base_site] = recorded.get("sites", {}).get(base_site, "")
    digests |= {site: identity["digest"] for site, identity in sources.sources.items()}
    trained_on = recorded.get("sites", {})
    return digests, sorted(site for site in set(digests) | set(trained_on) if trained_on.get(site) != digests.get(site))


def _read_labels(source: SourceConfig, workdir: Path, s3: S3Config, identity: dict | None = None) -> pd.DataFrame:
    """The labels CSV as (key column, key, label): one clear error naming the source for anything malformed."""
    where = f"source {source.site}: labels {source.labels}"
    local = local_path(source.labels)
    if local is None:
        local = fetch(source.labels, workdir / "labels", s3, identity=identity).path
    return read_labels_file(local, where, LABEL_KEYS)


def read_labels_file(
    local: Path, where: str, keys: tuple[str, ...], optional: tuple[str, ...] = (), conflicts: bool = False
) -> pd.DataFrame:
    """A labels CSV (a `label` column and exactly one of ``keys``; ``optional`` columns kept when present) as a
    table with ``attrs["key"]``; anything malformed is one DatasetSourceError starting with ``where``. Keys with both
    labels are an error, or with ``conflicts`` dropped and listed in ``attrs["conflicting"]``."""
    if not local.is_file():
        raise DatasetSourceError(f"{where}: file not found")
    if local.stat().st_size > MAX_LABELS_BYTES:
        raise DatasetSourceError(f"{where}: larger than {MAX_LABELS_BYTES // 2**20} MiB")
    try:
        # Spreadsheets save a byte-order mark, and in many locales a semicolon between columns.
        text = local.read_bytes().decode("utf-8-sig")
        header = text.split("\n", 1)[0]
        separator = ";" if ";" in header and "," not in header else ","
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, sep=separator)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DatasetSourceError(f"{where}: not a readable CSV ({str(error).splitlines()[0][:200]})") from None
    table.columns = [str(column).strip().lower() for column in table.columns]
    found = [column for column in keys if column in table.columns]
    if "label" not in table.columns or len(found) != 1:
        raise DatasetSourceError(
            f"{where}: needs a `label` column and one of {' or '.join(f'`{k}`' for k in keys)} (found columns "
            f"{list(table.columns)})"
        )
    key = found[0]
    table = table[[key, "label", *[c for c in optional if c in table.columns]]].apply(lambda c: c.str.strip())
    table["label"] = table["label"].str.upper()
    unknown = table[~table["label"].isin(CLASS_NAMES)]
    if len(unknown):
        row = int(unknown.index[0]) + 2  # the header is line 1
        raise DatasetSourceError(
            f"{where}: unknown label {unknown['label'].iloc[0][:40]!r} on line {row} ({len(unknown)} such rows); "
            f"labels are {' or '.join(CLASS_NAMES)}"
        )
    if (table[key] == "").any():
        row = int(table.index[table[key] == ""][0]) + 2
        raise DatasetSourceError(f"{where}: empty `{key}` on line {row}")
    labels_per_key = table.groupby(key)["label"].nunique()
    conflicting = labels_per_key[labels_per_key > 1]
    if len(conflicting) and not conflicts:
        raise DatasetSourceError(
            f"{where}: {len(conflicting)} `{key}` value(s) with both labels, e.g. line "
            f"{int(table.index[table[key] == conflicting.index[0]][0]) + 2}"
        )
    table = table[~table[key].isin(conflicting.index)].drop_duplicates(key, keep="last")
    table.attrs["key"] = key
    table.attrs["conflicting"] = sorted(conflicting.index)
    return table.reset_index(drop=True)


def _by_file_name(files: list[tuple[str, str, str]], table: pd.DataFrame, site: str) -> dict[str, str]:
    """relative path -> label, for the CSV's ``file`` column: a relative path, else a file name that is unique."""
    labels = dict(zip(table["file"], table["label"]))
    names: dict[str, list[str]] = {}
    for _, _, relative in files:
        names.setdefault(PurePosixPath(relative).name, []).append(relative)
    matched: dict[str, str] = {}
    for key, label in labels.items():
        key = key.replace("\\", "/").lstrip("./")
        if any(relative == key for _, _, relative in files):
            matched[key] = label
        elif len(names.get(key, [])) == 1:
            matched[names[key][0]] = label
        elif len(names.get(key, [])) > 1:
            raise DatasetSourceError(
                f"source {site}: labels name the file {key[:80]!r}, which is in {len(names[key])} folders; give its "
                "path inside the source instead"
            )
    return matched


def _check_patient_key(manifest: pd.DataFrame, site: str) -> None:
    if manifest["patient_id"].str.startswith("dicom:").any() and not os.environ.get(PATIENT_KEY_ENV):
        raise ConfigError(
            f"source {site} holds DICOM images and is split by patient: set {PATIENT_KEY_ENV} (the site secret that "
            "keys PatientID hashes) so that each patient keeps its split in every retraining"
        )


def load_source(
    source: SourceConfig, identity: dict, root: Path, data: DataConfig, s3: S3Config, workdir: Path
) -> tuple[pd.DataFrame, dict]:
    """One training source's images under ``root/sites/<site>/`` and their manifest rows (paths relative to ``root``,
    ``site`` set, ``split`` by the source's own folders or by patient, data.split), with its report."""
    site, relative_root = source.site, Path("sites", source.site)
    images = root / relative_root
    images.mkdir(parents=True, exist_ok=True)
    try:
        local = local_path(source.uri)
        if local is not None and local.is_dir():
            extraction = copy_tree(local, images, data.limits)
            if folder_digest(images) != identity["images"]["digest"]:
                raise DatasetSourceError("the folder changed while it was being read; run again")
        elif is_s3_prefix(source.uri):
            extraction, read = copy_prefix(source.uri, images, data.limits, s3.max_attempts)
            if read != identity["images"]["digest"]:
                raise DatasetSourceError("the S3 prefix changed while it was being read; run again")
        else:
            identified = {k: v for k, v in identity["images"].items() if k != "digest"}
            archive = fetch(source.uri, workdir / "download", s3, identity=identified)
            extraction = extract_tree(archive.path, images, data.limits)
        files = extraction.files
        labels_identity = {k: v for k, v in identity["labels_identity"].items() if k != "digest"}
        table = _read_labels(source, workdir, s3, labels_identity or None) if source.labels else None
        if table is not None and table.attrs["key"] == "file":
            matched = _by_file_name(files, table, site)
            labelled = [(split, matched[relative], relative) for split, _, relative in files if relative in matched]
            labels_without_image = len(table) - len(matched)
        elif table is None:
            labelled = [item for item in files if item[1]]
            labels_without_image = 0
        else:
            labelled = files  # keyed by sop_instance_uid: read from the headers while decoding
            labels_without_image = None
        unlabelled = len(files) - len(labelled)
        keep = {relative for _, _, relative in labelled}
        for _, _, relative in files:
            if relative not in keep:
                (images / relative).unlink(missing_ok=True)
        manifest, quarantined, converted = build_manifest(images, labelled, site)
        check_bad_fraction(len(labelled), quarantined, data.max_bad_fraction)
        if table is not None and table.attrs["key"] == "sop_instance_uid":
            by_uid = dict(zip(table["sop_instance_uid"], table["label"]))
            manifest["label"] = manifest["sop_instance_uid"].map(by_uid).fillna("")
            missing = manifest["label"] == ""
            for relative in manifest.loc[missing, "path"]:
                (images / relative).unlink(missing_ok=True)
            unlabelled += int(missing.sum())
            labels_without_image = len(set(by_uid) - set(manifest["sop_instance_uid"]))
            manifest = manifest.loc[~missing].reset_index(drop=True)
    except XrayError as error:
        raise type(error)(f"source {site} ({source.uri}): {error}") from None
    counts = {label: int((manifest["label"] == label).sum()) for label in CLASS_NAMES}
    if min(counts.values()) == 0:
        raise DatasetSourceError(
            f"source {site} ({source.uri}): no labelled {' or '.join(k for k, v in counts.items() if not v)} images "
            f"(found {counts}); a source needs both classes"
        )
    manifest["path"] = [(relative_root / path).as_posix() for path in manifest["path"]]
    manifest["patient_id"] = [
        p if p.startswith(("image:", "dicom:")) else f"{site}:{p}" for p in manifest["patient_id"]
    ]
    own = set(manifest["source_split"]) - {""}
    mode = source.splits
    if mode == "auto":
        mode = "archive" if {"train", "test"} <= own else "patient"
    if mode == "archive":
        if not {"train", "test"} <= own:
            raise DatasetSourceError(
                f"source {site} ({source.uri}): splits: archive needs train/ and test/ folders above the class "
                f"folders (found {sorted(own) or 'none'})"
            )
        manifest = manifest[manifest["source_split"].isin(SPLITS)].reset_index(drop=True)
        manifest["split"] = manifest["source_split"]
        if needs_val_split(manifest, data.min_val_per_class):
            manifest = carve_val(manifest, data.val_fraction, 0)
    else:
        _check_patient_key(manifest, site)
        manifest["split"] = stable_splits(manifest, site, data.split.val, data.split.test, data.split.key)
        manifest["source_split"] = ""
    report = {
        "site": site,
        "uri": source.uri,
        "labels": source.labels or "",
        "digest": identity["digest"],
        "splits_from": "the source's own folders" if mode == "archive" else "patient hash (data.split)",
        "counts": split_counts(manifest),
        "images": int(len(manifest)),
        "patients": int(manifest["patient_id"].nunique()),
        "quarantined": len(quarantined),
        "converted": converted,
        "unlabelled_files": unlabelled,
        "labels_without_image": labels_without_image,
        "junk_files": extraction.junk,
    }
    return manifest, report
