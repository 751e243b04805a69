"""Listing the files of a source lazily: a folder, a zip (under the training archives' limits), an S3 prefix or a PACS
(``dicomweb://``: :mod:`xray.storage.dicomweb`).

Each file is an :class:`ImageRef`: its display name and a function that reads its bytes (called in a worker thread
by the batch stream, ``xray.serving.batch``). Every file is listed whatever its name or extension: its content
decides whether it is an image (TIFF, BMP, 16-bit PNG and extension-less files included). Only operating-system
junk (``.DS_Store``, ``Thumbs.db``, ``._*``, ``__MACOSX/``) is left out, and counted.
"""

from __future__ import annotations

import hashlib
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from xray.config.limits import ArchiveLimits, PacsLimits
from xray.errors import ArchiveError, DatasetSourceError
from xray.storage import dicomweb, s3
from xray.storage.archive import Extraction, checked_entries, folder_labels, inflate_chunks, is_junk

JUNK = "system file (.DS_Store, Thumbs.db, ._*, __MACOSX/)"


def _listed(name: str, skipped: Counter) -> bool:
    """Whether a file is listed; junk is counted in ``skipped`` instead."""
    if is_junk(name):
        skipped[JUNK] += 1
        return False
    return True


@dataclass(frozen=True)
class ImageRef:
    """One input image: its display path and how to read its bytes (called in a worker thread)."""

    name: str
    read: Callable[[], bytes]


def _s3_refs(uri: str, max_attempts: int, skipped: Counter) -> Iterator[ImageRef]:
    from botocore.exceptions import BotoCoreError, ClientError  # lazy: botocore only where S3 is read

    parsed = urlparse(uri)
    if not parsed.netloc:
        raise DatasetSourceError(f"not an s3://bucket/prefix URI: {uri}")
    location = s3.S3Location(parsed.netloc, parsed.path.lstrip("/"))
    client = s3.make_client(max_attempts)

    def reader(key: str) -> Callable[[], bytes]:
        def read() -> bytes:
            try:
                return client.get_object(Bucket=location.bucket, Key=key)["Body"].read()
            except (BotoCoreError, ClientError) as error:
                raise s3.explain_error(error, s3.S3Location(location.bucket, key)) from None

        return read

    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key):
            for entry in page.get("Contents", []):
                if not entry["Key"].endswith("/") and _listed(entry["Key"], skipped):
                    yield ImageRef(f"s3://{location.bucket}/{entry['Key']}", reader(entry["Key"]))
    except (BotoCoreError, ClientError) as error:
        raise s3.explain_error(error, location) from None


def _zip_refs(path: Path, limits: ArchiveLimits, skipped: Counter) -> Iterator[ImageRef]:
    """Entries are checked before any is read (count, names, duplicates) and inflated under the byte and ratio
    limits of training archives; one ZipFile per reading thread (a ZipFile is not safe to share)."""
    with zipfile.ZipFile(path) as archive:
        infos = sorted(
            (
                info
                for info in checked_entries(archive, limits)
                if not info.is_dir() and _listed(info.filename, skipped)
            ),
            key=lambda info: info.filename,
        )
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_total_bytes:
        raise ArchiveError(
            f"{path.name} declares {declared} bytes of files, over max_total_bytes={limits.max_total_bytes}"
        )
    local, lock, inflated = threading.local(), threading.Lock(), [0]

    def reader(info: zipfile.ZipInfo) -> Callable[[], bytes]:
        def read() -> bytes:
            if not hasattr(local, "archive"):
                local.archive = zipfile.ZipFile(path)
            # The real inflated bytes count, whatever the headers claim: each entry against what is left of the
            # archive's budget, and the running total after it.
            data = b"".join(inflate_chunks(local.archive, info, limits, limits.max_total_bytes - inflated[0]))
            with lock:
                inflated[0] += len(data)
                if inflated[0] > limits.max_total_bytes:
                    raise ArchiveError(
                        f"archive inflates past max_total_bytes={limits.max_total_bytes} at entry '{info.filename}'"
                    )
            return data

        return read

    for info in infos:
        yield ImageRef(f"{path}!{info.filename}", reader(info))


def list_images(
    source: str,
    limits: ArchiveLimits | None = None,
    max_attempts: int = 5,
    skipped: Counter | None = None,
    pacs: PacsLimits | None = None,
) -> Iterator[ImageRef]:
    """Every file under a folder, in a zip, or under an s3:// prefix (or each image of a PACS, under ``pacs``), in
    name order, lazily; junk files are counted in ``skipped`` (by reason) instead.

    Raises DatasetSourceError when the source holds no file (after listing it).
    """
    limits = limits or ArchiveLimits()
    skipped = Counter() if skipped is None else skipped
    count = 0
    for ref in _refs(source, limits, max_attempts, skipped, pacs):
        count += 1
        yield ref
    if not count:
        junk = f" (only {sum(skipped.values())} system files)" if skipped else ""
        raise DatasetSourceError(f"no files found at {source}{junk}")


def _refs(
    source: str, limits: ArchiveLimits, max_attempts: int, skipped: Counter, pacs: PacsLimits | None
) -> Iterator[ImageRef]:
    if source.startswith("s3://"):
        yield from _s3_refs(source, max_attempts, skipped)
        return
    if dicomweb.is_dicomweb(source):  # each image instance of the matching studies, read over WADO-RS
        endpoint = dicomweb.parse(source)
        client = dicomweb.Client(endpoint, max_attempts, limits=pacs)
        for uids in client.instances(skipped):
            yield ImageRef(endpoint.instance_uri(*uids), partial(client.retrieve, *uids))
        return
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        files = sorted(
            str(p) for p in path.rglob("*") if p.is_file() and _listed(p.relative_to(path).as_posix(), skipped)
        )
        for name in files:
            yield ImageRef(name, Path(name).read_bytes)
    elif path.is_file() and zipfile.is_zipfile(path):
        yield from _zip_refs(path, limits, skipped)
    elif path.is_file() and path.suffix.lower() == ".zip":
        raise DatasetSourceError(f"{source} is not a readable zip archive")
    elif path.is_file():
        yield ImageRef(str(path), path.read_bytes)
    else:
        raise DatasetSourceError(f"no images at {source}: not a folder, zip, file or s3:// prefix")


def is_s3_prefix(uri: str) -> bool:
    """An ``s3://bucket/prefix`` of files, as opposed to one ``s3://bucket/key.zip`` archive."""
    return uri.startswith("s3://") and not uri.lower().endswith(".zip")


def _prefix(uri: str) -> s3.S3Location:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise DatasetSourceError(f"not an s3://bucket/prefix URI: {uri}")
    return s3.S3Location(parsed.netloc, parsed.path.lstrip("/"))


def prefix_digest(uri: str, max_attempts: int = 5) -> str:
    """SHA-256 over every object's key (relative to the prefix), ETag and size: an S3 prefix's content, by listing
    alone (junk left out, as when it is copied)."""
    from botocore.exceptions import BotoCoreError, ClientError  # lazy: botocore only where S3 is read

    location, client = _prefix(uri), s3.make_client(max_attempts)
    digest, objects = hashlib.sha256(), 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key):
            for entry in page.get("Contents", []):
                relative = entry["Key"][len(location.key) :].lstrip("/")
                if entry["Key"].endswith("/") or not relative or is_junk(relative):
                    continue
                digest.update(f"{relative}\0{entry['ETag'].strip(chr(34))}\0{entry['Size']}\n".encode())
                objects += 1
    except (BotoCoreError, ClientError) as error:
        raise s3.explain_error(error, location) from None
    if not objects:
        raise DatasetSourceError(f"no files under {uri}")
    return digest.hexdigest()


def copy_prefix(uri: str, destination: Path, limits: ArchiveLimits, max_attempts: int = 5) -> tuple[Extraction, str]:
    """Every file under an S3 prefix, downloaded to ``destination`` at its key relative to the prefix, under the
    archive limits (count, per-file and total bytes); with the :func:`prefix_digest` of what was read, so a caller can
    tell that the prefix changed since it was identified."""
    from botocore.exceptions import BotoCoreError, ClientError  # lazy: botocore only where S3 is read

    location, client = _prefix(uri), s3.make_client(max_attempts)
    result, digest, entries = Extraction(root=uri), hashlib.sha256(), []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key):
            entries.extend(page.get("Contents", []))
    except (BotoCoreError, ClientError) as error:
        raise s3.explain_error(error, location) from None
    if len(entries) > limits.max_entries:
        raise ArchiveError(f"{uri} has {len(entries)} objects, over max_entries={limits.max_entries}")
    for entry in sorted(entries, key=lambda e: e["Key"]):
        relative = entry["Key"][len(location.key) :].lstrip("/")
        if entry["Key"].endswith("/") or not relative:
            continue
        if is_junk(relative):
            result.junk += 1
            continue
        if ".." in PurePosixPath(relative).parts or relative.startswith("/"):
            raise ArchiveError(f"unsafe key under {uri}: {entry['Key']!r}")
        if entry["Size"] > limits.max_entry_bytes:
            raise ArchiveError(
                f"{entry['Key']} has {entry['Size']} bytes, over max_entry_bytes={limits.max_entry_bytes}"
            )
        if result.bytes_written + entry["Size"] > limits.max_total_bytes:
            raise ArchiveError(f"{uri} holds more than max_total_bytes={limits.max_total_bytes}")
        key = s3.S3Location(location.bucket, entry["Key"])
        try:
            response = client.get_object(Bucket=key.bucket, Key=key.key)
            data = response["Body"].read(limits.max_entry_bytes + 1)
        except (BotoCoreError, ClientError) as error:
            raise s3.explain_error(error, key) from None
        if len(data) > limits.max_entry_bytes:
            raise ArchiveError(f"{entry['Key']} is over max_entry_bytes={limits.max_entry_bytes}")
        target = destination.joinpath(*PurePosixPath(relative).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        result.bytes_written += len(data)
        digest.update(f"{relative}\0{response['ETag'].strip(chr(34))}\0{len(data)}\n".encode())
        result.files.append((*folder_labels(relative), relative))
    return result, digest.hexdigest()
