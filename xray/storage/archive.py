"""Safe extraction of a dataset archive and discovery of its split root.

Archives come from outside (users, other teams, Kaggle), so every entry is
checked before anything is written: no absolute paths, no ``..``, no
symlinks, and zip-bomb limits enforced on the bytes actually inflated, never
on the sizes the header claims.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from xray import CLASS_NAMES, SPLITS
from xray.config.limits import ArchiveLimits
from xray.errors import ArchiveError

JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini", ".gitkeep"}
JUNK_DIRS = {"__macosx"}
REQUIRED_SPLITS = ("train", "test")
CHUNK = 1024 * 1024
# Below this many inflated bytes the ratio check is noise (a 0-byte or tiny entry).
RATIO_FLOOR_BYTES = 1024 * 1024


@dataclass
class Extraction:
    root: str
    """Split root inside the archive, e.g. ``chest_xray``."""
    files: list[tuple[str, str, str]] = field(default_factory=list)
    """(split, label, path relative to the extraction directory)."""
    junk: int = 0
    ignored: int = 0
    """Entries outside the split root, e.g. a nested duplicate copy of the dataset."""
    bytes_written: int = 0


def is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and (
        any(p.lower() in JUNK_DIRS for p in parts[:-1]) or parts[-1].lower() in JUNK_NAMES or parts[-1].startswith("._")
    )


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def check_entry(info: zipfile.ZipInfo) -> None:
    name = info.filename
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"unsafe archive: absolute path in entry '{name}'")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise ArchiveError(f"unsafe archive: path traversal in entry '{name}'")
    if _is_symlink(info):
        raise ArchiveError(f"unsafe archive: symlink entry '{name}'")


def check_unique_names(names: list[str]) -> None:
    """Two entries with one path are ambiguous (unzip tools disagree on which copy wins): refuse the archive."""
    repeated = sorted(name for name, count in Counter(names).items() if count > 1 and not name.endswith("/"))
    if repeated:
        shown = ", ".join(f"'{name}'" for name in repeated[:3]) + (
            f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""
        )
        raise ArchiveError(
            f"ambiguous archive: more than one entry named {shown}; tools disagree on which copy "
            "they extract, so the archive is refused"
        )


def checked_entries(archive: zipfile.ZipFile, limits: ArchiveLimits) -> list[zipfile.ZipInfo]:
    """Every entry, after the checks that come before any write: count, names (absolute, ``..``, symlinks) and
    no two entries with one path."""
    infos = archive.infolist()
    if len(infos) > limits.max_entries:
        raise ArchiveError(f"archive has {len(infos)} entries, over max_entries={limits.max_entries}")
    for info in infos:
        check_entry(info)
    check_unique_names([info.filename for info in infos])
    return infos


def open_archive(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise ArchiveError(f"archive not found: {path}")
    if path.stat().st_size == 0:
        raise ArchiveError(f"{path.name} is empty (0 bytes), not a zip archive")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ArchiveError(
            f"{path.name} is not a readable zip archive ({error}); it may be truncated or another format"
        ) from None
    if not archive.infolist():
        archive.close()
        raise ArchiveError(f"{path.name} is an empty zip archive: no entries")
    return archive


def find_split_root(names: list[str]) -> str:
    """The shallowest folder that holds ``train/<CLASS>/`` and ``test/<CLASS>/`` files.

    Kaggle's archive also carries ``chest_xray/chest_xray/...`` (a duplicate)
    and ``__MACOSX/``; taking the shallowest root counts each image once.
    """
    candidates: dict[str, set[str]] = {}
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) < 3 or is_junk(name) or name.endswith("/"):
            continue
        root, split = "/".join(parts[:-3]), parts[-3].lower()
        if split in SPLITS:
            candidates.setdefault(root, set()).add(split)
    complete = [root for root, splits in candidates.items() if set(REQUIRED_SPLITS) <= splits]
    if not complete:
        found = sorted({f"{root or '.'}/{split}" for root, splits in candidates.items() for split in splits})
        raise ArchiveError(
            "archive has no folder with both train/ and test/ splits of class folders "
            f"(found splits: {', '.join(found) if found else 'none'})"
        )
    return min(complete, key=lambda root: (root.count("/") + bool(root), root))


def _classify(names: list[str], root: str) -> tuple[dict[str, tuple[str, str]], int]:
    """Map entry name -> (split, label) for files under the root; count the rest."""
    prefix = f"{root}/" if root else ""
    selected, ignored = {}, 0
    found: dict[str, Counter] = {}
    for name in names:
        if name.endswith("/") or is_junk(name):
            continue
        rest = name[len(prefix) :] if name.startswith(prefix) else None
        parts = PurePosixPath(rest).parts if rest is not None else ()
        if len(parts) != 3 or parts[0].lower() not in SPLITS:
            ignored += 1
            continue
        split, label = parts[0].lower(), parts[1]
        found.setdefault(split, Counter())[label] += 1
        selected[name] = (split, label)
    _check_layout(found)
    return selected, ignored


def _check_layout(found: dict[str, Counter]) -> None:
    listing = "; ".join(f"{s}: {dict(c)}" for s, c in sorted(found.items()))
    for split, labels in found.items():
        unknown = sorted(set(labels) - set(CLASS_NAMES))
        if unknown:
            raise ArchiveError(
                f"unknown class folder(s) {unknown} in split '{split}'; expected {list(CLASS_NAMES)} (found {listing})"
            )
    for split in REQUIRED_SPLITS:
        for label in CLASS_NAMES:
            if found.get(split, Counter())[label] == 0:
                raise ArchiveError(f"class {label} has no images in split '{split}' (found {listing})")


def inflate_chunks(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits, budget: int):
    """One entry's bytes in chunks, counted as they inflate; the moment a limit is passed, ArchiveError.

    ``budget``: the bytes the whole archive may still inflate to (max_total_bytes less what came before).
    """
    if info.file_size > limits.max_entry_bytes:
        raise ArchiveError(
            f"entry '{info.filename}' declares {info.file_size} bytes, over max_entry_bytes={limits.max_entry_bytes}"
        )
    inflated = 0
    try:
        with archive.open(info) as source:
            while chunk := source.read(CHUNK):
                inflated += len(chunk)
                if inflated > limits.max_entry_bytes:
                    raise ArchiveError(
                        f"entry '{info.filename}' inflates past max_entry_bytes={limits.max_entry_bytes}"
                    )
                if inflated > budget:
                    raise ArchiveError(
                        f"archive inflates past max_total_bytes={limits.max_total_bytes} at entry '{info.filename}'"
                    )
                if inflated > RATIO_FLOOR_BYTES and inflated > limits.max_compression_ratio * max(
                    info.compress_size, 1
                ):
                    raise ArchiveError(
                        f"entry '{info.filename}' compresses more than max_compression_ratio="
                        f"{limits.max_compression_ratio:g}:1 (zip bomb?)"
                    )
                yield chunk
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ArchiveError(
            f"entry '{info.filename}' cannot be read ({error}); the archive may be truncated or corrupt"
        ) from None


def _inflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limits: ArchiveLimits, budget: int) -> int:
    """Copy one entry while counting real bytes; abort the moment a limit is passed."""
    written = 0
    try:
        with open(target, "wb") as out:
            for chunk in inflate_chunks(archive, info, limits, budget):
                out.write(chunk)
                written += len(chunk)
    except (ArchiveError, OSError):
        target.unlink(missing_ok=True)
        raise
    return written


def extract(path: Path, destination: Path, limits: ArchiveLimits) -> Extraction:
    """Validate every entry, then extract the images under the split root.

    Files land in ``destination/<split>/<label>/<file name>``; nothing is
    written anywhere else.
    """
    with open_archive(path) as archive:
        infos = checked_entries(archive, limits)
        names = [info.filename for info in infos]
        root = find_split_root(names)
        selected, ignored = _classify(names, root)
        result = Extraction(root=root or ".", ignored=ignored)
        result.junk = sum(1 for n in names if not n.endswith("/") and is_junk(n))
        for info in infos:
            if info.filename not in selected:
                continue
            split, label = selected[info.filename]
            relative = Path(split, label, PurePosixPath(info.filename).name)
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            result.bytes_written += _inflate(
                archive, info, target, limits, limits.max_total_bytes - result.bytes_written
            )
            result.files.append((split, label, relative.as_posix()))
    return result


def label_of(name: str) -> str | None:
    """NORMAL or PNEUMONIA when a file's folder is named so (any case, any depth), else None."""
    parts = PurePosixPath(name).parts
    if len(parts) < 2 or is_junk(name) or name.endswith("/"):
        return None
    folder = parts[-2].upper()
    return folder if folder in CLASS_NAMES else None


def extract_labelled(path: Path, destination: Path, limits: ArchiveLimits) -> Extraction:
    """Validate every entry like :func:`extract`, then extract the files that sit in a ``NORMAL/`` or
    ``PNEUMONIA/`` folder at any depth to ``destination/<label>/<n>_<file name>``.

    A labelled site's archive has no splits; the same file name may appear in several folders, so each file gets
    the index of its entry as a prefix.
    """
    with open_archive(path) as archive:
        infos = checked_entries(archive, limits)
        result = Extraction(root=".")
        for index, info in enumerate(infos):
            if info.is_dir():
                continue
            if is_junk(info.filename):
                result.junk += 1
                continue
            label = label_of(info.filename)
            if label is None:
                result.ignored += 1
                continue
            relative = Path(label, f"{index:06d}_{PurePosixPath(info.filename).name}")
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            result.bytes_written += _inflate(
                archive, info, target, limits, limits.max_total_bytes - result.bytes_written
            )
            result.files.append(("site", label, relative.as_posix()))
    _check_labelled(result, path.name)
    return result


def _check_labelled(result: Extraction, source: str) -> None:
    counts = Counter(label for _, label, _ in result.files)
    missing = [label for label in CLASS_NAMES if counts[label] == 0]
    if missing:
        raise ArchiveError(
            f"{source}: no images in a {' or '.join(f'{m}/' for m in missing)} folder (found "
            f"{dict(counts) or 'no NORMAL/ or PNEUMONIA/ folders'}); a labelled site needs both classes"
        )


def copy_labelled(folder: Path, destination: Path, limits: ArchiveLimits) -> Extraction:
    """The folder version of :func:`extract_labelled`: files under NORMAL/ or PNEUMONIA/ at any depth, copied
    (symlinks are not followed), with the same per-file and total size limits."""
    result = Extraction(root=str(folder))
    for index, (file, name) in enumerate(_folder_files(folder, limits)):
        if is_junk(name):
            result.junk += 1
            continue
        label = label_of(name)
        if label is None:
            result.ignored += 1
            continue
        relative = Path(label, f"{index:06d}_{file.name}")
        _copy_within_limits(file, name, destination / relative, limits, result, f"{folder} holds labelled images")
        result.files.append(("site", label, relative.as_posix()))
    _check_labelled(result, str(folder))
    return result


def _folder_files(folder: Path, limits: ArchiveLimits) -> list[tuple[Path, str]]:
    """(file, path relative to ``folder``) of every file at any depth, symlinks not followed, under max_entries."""
    files = sorted(p for p in folder.rglob("*") if not p.is_symlink() and p.is_file())
    if len(files) > limits.max_entries:
        raise ArchiveError(f"{folder} has {len(files)} files, over max_entries={limits.max_entries}")
    return [(file, file.relative_to(folder).as_posix()) for file in files]


def _copy_within_limits(
    file: Path, name: str, target: Path, limits: ArchiveLimits, result: Extraction, what: str
) -> None:
    """Copy one file of a folder under the per-file and running total limits, counting it in ``result``."""
    size = file.stat().st_size
    if size > limits.max_entry_bytes:
        raise ArchiveError(f"file '{name}' has {size} bytes, over max_entry_bytes={limits.max_entry_bytes}")
    if result.bytes_written + size > limits.max_total_bytes:
        raise ArchiveError(f"{what} of more than max_total_bytes={limits.max_total_bytes}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(file, target)
    result.bytes_written += size


def extract_tree(path: Path, destination: Path, limits: ArchiveLimits) -> Extraction:
    """Validate every entry like :func:`extract`, then extract every file that is not junk to ``destination`` at its
    own path inside the archive (checked: no absolute paths, no ``..``, no symlinks, no two entries with one name).
    Each file's ``(split, label)`` is what its folders say (``train/PNEUMONIA/x.dcm``), empty where they say nothing:
    a source labelled by a CSV, or split by patient, decides the rest."""
    with open_archive(path) as archive:
        infos = checked_entries(archive, limits)
        result = Extraction(root=".")
        for info in infos:
            if info.is_dir():
                continue
            if is_junk(info.filename):
                result.junk += 1
                continue
            relative = PurePosixPath(info.filename.replace("\\", "/"))
            target = destination.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            result.bytes_written += _inflate(
                archive, info, target, limits, limits.max_total_bytes - result.bytes_written
            )
            result.files.append((*folder_labels(relative.as_posix()), relative.as_posix()))
    return result


def copy_tree(folder: Path, destination: Path, limits: ArchiveLimits) -> Extraction:
    """The folder version of :func:`extract_tree`: every file at any depth copied at its own relative path (symlinks
    are not followed), with the same per-file and total size limits."""
    if not folder.is_dir():
        raise ArchiveError(f"source folder not found: {folder}")
    result = Extraction(root=str(folder))
    for file, name in _folder_files(folder, limits):
        if is_junk(name):
            result.junk += 1
            continue
        _copy_within_limits(file, name, destination / name, limits, result, f"{folder} holds files")
        result.files.append((*folder_labels(name), name))
    return result


def folder_labels(name: str) -> tuple[str, str]:
    """(split, label) that a file's folders give: ``.../train/NORMAL/f`` -> ("train", "NORMAL"), ``.../NORMAL/f`` ->
    ("", "NORMAL"), anything else ("", "")."""
    label = label_of(name) or ""
    parts = PurePosixPath(name).parts
    split = parts[-3].lower() if label and len(parts) >= 3 and parts[-3].lower() in SPLITS else ""
    return split, label
