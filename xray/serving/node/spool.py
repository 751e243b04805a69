"""The node's spool: every instance kept is on disk, synced, before the sender hears success; what became of it is
recorded beside it, so that a restart (after ``kill -9`` too) reports what was not reported yet, and nothing twice.

Layout under the spool's root (docs/OPERATIONS.md, "DICOM node"):

- ``studies/<study key>/<instance key>.dcm``: the received files themselves, **patient data**, kept until every result
  of the instance is delivered (or dead-lettered); ``studies/<study key>/urgent`` when a sender asked for high priority.
- ``done/<model version>/<instance key>``: the instance was analysed by that version (empty files).
- ``outbox/<instance key>/<destination key>-<kind>.dcm``: results on their way, sent once the folder holds ``ready``
  (written after the instance is marked done); ``dead-letter/`` holds those whose tries ran out, moved back into the
  outbox when the node starts.

Keys are a SHA-256 of the UID (:func:`key`): no file name and no index entry holds a DICOM value. The UIDs are read
again from the files when a study is analysed."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

GB = 1024**3
URGENT = "urgent"
READY = "ready"


class SpoolFull(Exception):
    """No room: the spool would pass its size limit, or the disk is full. The sender is told out of resources."""


def key(uid: str) -> str:
    """The name of a UID in the spool: 32 hex characters of its SHA-256."""
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_synced(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all, on disk (the file and its folder entry synced) when this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
    _fsync_folder(path.parent)


@dataclass(frozen=True)
class Study:
    """A study in the spool: its key, its instances' files, whether a sender marked it urgent, when it last grew."""

    key: str
    files: tuple[Path, ...]
    urgent: bool
    last: float


class Spool:
    """The spool at ``root``, at most ``max_bytes`` of received files. Thread-safe: the SCP's association threads
    store while the node's analysis thread reads and prunes."""

    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        for folder in ("studies", "done", "outbox", "dead-letter"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # patient data
        for partial in self.root.glob("studies/*/.*.partial"):  # a write that a kill interrupted: never acknowledged
            partial.unlink()
        self.size = sum(path.stat().st_size for path in self.root.glob("studies/*/*.dcm"))

    def path(self, study_uid: str, instance_uid: str) -> Path:
        return self.root / "studies" / key(study_uid) / f"{key(instance_uid)}.dcm"

    def done(self, version: str, instance_uid: str) -> bool:
        return (self.root / "done" / str(version) / key(instance_uid)).exists()

    def store(self, data: bytes, study_uid: str, instance_uid: str, urgent: bool = False) -> Path:
        """Keep one received instance (a repeat replaces the copy not yet analysed); raises :class:`SpoolFull`."""
        path = self.path(study_uid, instance_uid)
        with self.lock:
            before = path.stat().st_size if path.exists() else 0
            if self.size - before + len(data) > self.max_bytes:
                raise SpoolFull(f"the spool holds {self.size / GB:.2f} GB, its limit is {self.max_bytes / GB:.2f} GB")
            try:
                write_synced(path, data)
                if urgent and not (path.parent / URGENT).exists():
                    write_synced(path.parent / URGENT, b"")
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpoolFull(f"the spool's disk is full ({errno.errorcode[error.errno]})") from None
                raise
            self.size += len(data) - before
        return path

    def studies(self) -> list[Study]:
        """Every study with an instance in the spool, urgent ones first, then the oldest."""
        found = []
        for folder in (self.root / "studies").iterdir():
            files = tuple(sorted(folder.glob("*.dcm")))
            if not files:
                continue
            try:
                last = max(path.stat().st_mtime for path in files)
            except FileNotFoundError:  # pruned meanwhile
                continue
            found.append(Study(folder.name, files, (folder / URGENT).exists(), last))
        return sorted(found, key=lambda study: (not study.urgent, study.last))

    def stable(self, seconds: float, now: float | None = None) -> list[Study]:
        """The studies without a new instance for ``seconds``, in the order they are to be analysed."""
        now = time.time() if now is None else now
        return [study for study in self.studies() if now - study.last >= seconds]

    def mark_done(self, version: str, instance_key: str) -> None:
        write_synced(self.root / "done" / str(version) / instance_key, b"")

    # -- results on their way --

    def outbox(self, instance_key: str) -> Path:
        return self.root / "outbox" / instance_key

    def post(self, instance_key: str, name: str, data: bytes) -> None:
        write_synced(self.outbox(instance_key) / name, data)

    def hold(self, instance_key: str) -> None:
        """The instance's outbox not released (before its results are posted): a release left by another version,
        whose results have left, must not send these before the instance is marked done for this one."""
        marker = self.outbox(instance_key) / READY
        if marker.exists():
            marker.unlink()
            _fsync_folder(marker.parent)

    def release(self, instance_key: str) -> None:
        """The instance's results may go: written once it is marked done, so that a result never leaves before its
        instance is recorded as reported (a restart would otherwise send it again)."""
        if self.outbox(instance_key).is_dir():
            write_synced(self.outbox(instance_key) / READY, b"")

    def waiting(self) -> list[Path]:
        """Every released result in the outbox, oldest instance first."""
        found = []
        for folder in (self.root / "outbox").iterdir():
            try:
                if (folder / READY).exists():
                    found.append((folder.stat().st_mtime, folder))
            except FileNotFoundError:  # pruned meanwhile
                continue
        return [path for _, folder in sorted(found) for path in sorted(folder.glob("*.dcm"))]

    def dead_letter(self, path: Path) -> None:
        target = self.root / "dead-letter" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
        _fsync_folder(target.parent)

    def revive(self) -> int:
        """The dead letters back in the outbox (at start): how many."""
        moved = 0
        for path in sorted((self.root / "dead-letter").glob("*/*.dcm")):
            target = self.outbox(path.parent.name) / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
            write_synced(target.parent / READY, b"")
            moved += 1
        return moved

    def prune(self, study: Study, version: str) -> int:
        """Remove the study's files that ``version`` analysed and whose results left the outbox (delivered or dead-
        lettered: the dead letters carry what is needed); the study's folder when it is empty. How many removed."""
        removed = 0
        with self.lock:
            for path in study.files:
                instance = path.stem
                pending = self.outbox(instance)
                if not (self.root / "done" / str(version) / instance).exists():
                    continue
                if pending.exists() and any(pending.glob("*.dcm")):
                    continue
                shutil.rmtree(pending, ignore_errors=True)
                try:
                    size = path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    continue
                self.size -= size
                removed += 1
            folder = self.root / "studies" / study.key
            if not any(folder.glob("*.dcm")):
                shutil.rmtree(folder, ignore_errors=True)
        return removed
