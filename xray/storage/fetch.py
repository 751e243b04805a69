"""Fetching the dataset archive: s3:// through boto3, local paths read directly."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from xray.config.s3 import S3Config
from xray.errors import DatasetSourceError
from xray.storage import s3

logger = logging.getLogger(__name__)


@dataclass
class RawArchive:
    """The archive bytes on this machine plus where they came from."""

    path: Path
    source_uri: str
    size: int
    sha256: str
    etag: str | None = None

    def metadata(self) -> dict:
        return {"source_uri": self.source_uri, "size": self.size, "sha256": self.sha256, "etag": self.etag or ""}


@dataclass
class ArchiveIdentity:
    """What identifies the archive's content now (:func:`locate`): an S3 object's ETag and size, or a local file's
    SHA-256 and size. A ZenML artifact: the download step is cached on it."""

    source_uri: str
    size: int
    sha256: str | None = None
    etag: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _progress(uri: str):
    state = {"next": 0.0}

    def report(done: int, total: int) -> None:
        if total and done / total >= state["next"]:
            logger.info(f"  downloading {uri}: {done / 2**20:.1f}/{total / 2**20:.1f} MiB ({done / total:.0%})")
            state["next"] += 0.25

    return report


def locate(uri: str, config: S3Config) -> dict:
    """What identifies the archive's content now, without reading it all: an S3 object's ETag and size (HEAD), or a
    local file's SHA-256 and size. Equal identities mean equal bytes, so the download step can be cached on it."""
    path = s3.local_path(uri)
    if path is None:
        location = s3.parse_s3_uri(uri)
        client = s3.make_client(config.max_attempts, config.connect_timeout_s, config.read_timeout_s)
        head = s3.head(client, location)
        identity = {"source_uri": location.uri, "size": head["size"], "etag": head["etag"]}
        return identity | ({"sha256": head["sha256"]} if head["sha256"] else {})
    if not path.is_file():
        raise DatasetSourceError(f"dataset archive not found: {path}")
    return {"source_uri": str(path), "size": path.stat().st_size, "sha256": s3.sha256_file(path)}


def fetch(
    uri: str, workdir: Path, config: S3Config, expected_sha256: str | None = None, identity: dict | None = None
) -> RawArchive:
    """Copy the archive into ``workdir`` and checksum it; fail before extraction on a mismatch with
    ``expected_sha256`` or with the ``identity`` :func:`locate` saw (the object changed in between)."""
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / "archive.zip"
    path = s3.local_path(uri)
    if path is None:
        location = s3.parse_s3_uri(uri)
        client = s3.make_client(config.max_attempts, config.connect_timeout_s, config.read_timeout_s)
        info = s3.download(client, location, target, progress=_progress(uri))
        archive = RawArchive(target, location.uri, info["size"], info["sha256"], info["etag"])
    else:
        if not path.is_file():
            raise DatasetSourceError(f"dataset archive not found: {path}")
        shutil.copyfile(path, target)
        archive = RawArchive(target, str(path), target.stat().st_size, s3.sha256_file(target))
    if identity is not None:
        seen = archive.metadata()
        changed = [key for key in ("size", "etag", "sha256") if key in identity and identity[key] != seen[key]]
        if changed:
            raise DatasetSourceError(
                f"{archive.source_uri} changed while it was being read ({', '.join(changed)} differ from a moment "
                "before); run again"
            )
    if expected_sha256 and archive.sha256 != expected_sha256:
        raise DatasetSourceError(
            f"checksum mismatch for {archive.source_uri}: sha256 {archive.sha256} != expected_sha256 {expected_sha256}"
        )
    return archive
