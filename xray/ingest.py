"""Fetching the dataset archive: s3:// through boto3, local paths read directly."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from xray import s3
from xray.config import S3Config
from xray.errors import DatasetSourceError

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


def _progress(uri: str):
    state = {"next": 0.0}

    def report(done: int, total: int) -> None:
        if total and done / total >= state["next"]:
            logger.info(f"  downloading {uri}: {done / 2**20:.1f}/{total / 2**20:.1f} MiB ({done / total:.0%})")
            state["next"] += 0.25

    return report


def fetch(uri: str, workdir: Path, config: S3Config, expected_sha256: str | None = None) -> RawArchive:
    """Copy the archive into ``workdir`` and checksum it; fail before extraction on a mismatch."""
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
    if expected_sha256 and archive.sha256 != expected_sha256:
        raise DatasetSourceError(
            f"checksum mismatch for {archive.source_uri}: sha256 {archive.sha256} != expected_sha256 {expected_sha256}"
        )
    return archive
