"""The prediction log: every answer of batch inference and of serving, kept for when the labels come back.

One Parquet dataset, partitioned by UTC date: ``<root>/date=YYYY-MM-DD/<source>-<HHMMSS>-<random>.parquet``, one part
per flush, never rewritten (so writers never contend: each batch run and each serving worker writes its own parts).
``root`` is a folder or an ``s3://`` prefix; the pipelines put it in the artifact store (``monitoring.prediction_log``),
serving takes it from ``XRAY_PREDICTION_LOG``. Rows carry what a prediction was (time, version, site, operating
point, threshold, probability, label, status, reason) and how to find its image again (sha256, DICOM UIDs, the path
in its input): never a patient's name, ID or birth date, which no prediction row has to begin with.

Serving logs through :class:`BackgroundLog`: a request only puts its rows on a queue; a daemon thread writes a part
every ``flush_rows`` rows or ``flush_s`` seconds, and at exit. A failed write keeps its rows for the next flush and
says so in one log line: a log that cannot be written never fails a prediction.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import queue
import secrets
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xray.errors import DatasetSourceError
from xray.storage import s3

logger = logging.getLogger(__name__)

OFF = "off"
ENVIRONMENT = "XRAY_PREDICTION_LOG"
SOURCES = ("batch", "serving")
SCHEMA = pa.schema(
    [
        ("time", pa.timestamp("us", tz="UTC")),
        ("source", pa.string()),
        ("input", pa.string()),
        ("path", pa.string()),
        ("model_version", pa.string()),
        ("site", pa.string()),
        ("operating_point", pa.string()),
        ("threshold", pa.float64()),
        ("sha256", pa.string()),
        ("study_instance_uid", pa.string()),
        ("series_instance_uid", pa.string()),
        ("sop_instance_uid", pa.string()),
        ("probability", pa.float64()),
        ("label", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("ood_score", pa.float64()),
    ]
)
COLUMNS = SCHEMA.names


def without_credentials(uri: str) -> str:
    """An input URI as it may be logged: no user, password, query or fragment (a presigned URL's signature)."""
    parts = urlsplit(uri)
    if not parts.scheme or parts.scheme == "file":
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class FolderStore:
    def __init__(self, root: str):
        self.root = Path(root).expanduser()

    def write(self, relative: str, data: bytes) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        partial.replace(path)  # a reader never sees half a part

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.glob("date=*/*.parquet"))

    def read(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()


class S3Store:
    def __init__(self, root: str, max_attempts: int = 5):
        self.location = s3.parse_s3_uri(root.rstrip("/") + "/")
        self.client = s3.make_client(max_attempts)

    def _key(self, relative: str) -> str:
        return f"{self.location.key}{relative}"

    def write(self, relative: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.location.bucket, Key=self._key(relative), Body=data)

    def list(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=self.location.key
        )
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
        return sorted(k[len(self.location.key) :] for k in keys if k.endswith(".parquet"))

    def read(self, relative: str) -> bytes:
        return self.client.get_object(Bucket=self.location.bucket, Key=self._key(relative))["Body"].read()


def open_store(root: str, max_attempts: int = 5):
    """A folder or an s3:// prefix; anything else is one clear error."""
    if root.startswith("s3://"):
        return S3Store(root, max_attempts)
    if "://" in root and not root.startswith("file://"):
        raise DatasetSourceError(f"prediction log {without_credentials(root)}: a folder or an s3:// prefix, please")
    return FolderStore(root.removeprefix("file://"))


def log_rows(table: pd.DataFrame, source: str, input_uri: str = "", now: datetime | None = None) -> pd.DataFrame:
    """Prediction rows (xray.serving.predictor.OUTPUT_COLUMNS, path, sha256) as log rows: only the log's columns."""
    rows = pd.DataFrame(index=table.index)
    rows["time"] = pd.Timestamp(now or datetime.now(timezone.utc))
    rows["source"] = source
    rows["input"] = without_credentials(input_uri)
    for column in COLUMNS[3:]:
        rows[column] = table[column] if column in table.columns else None
    for column in ("path", "model_version", "site", "operating_point", "sha256", "label", "status", "reason"):
        rows[column] = rows[column].fillna("").astype(str)
    for column in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
        rows[column] = rows[column].fillna("").astype(str)
    return rows.reset_index(drop=True)


def _part(rows: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    table = pa.Table.from_pandas(rows[COLUMNS], schema=SCHEMA, preserve_index=False)
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


class PredictionLog:
    """Rows appended in memory, written as one part per ``flush`` (and every ``flush_rows`` rows)."""

    def __init__(self, root: str, source: str, input_uri: str = "", store=None, flush_rows: int = 5000):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}")
        self.root, self.source, self.input_uri = root, source, input_uri
        self.store = store if store is not None else open_store(root)
        self.flush_rows = flush_rows
        self.pending: list[pd.DataFrame] = []
        self.rows = 0
        self.written = 0

    def append(self, table: pd.DataFrame) -> None:
        if table.empty:
            return
        self.pending.append(log_rows(table, self.source, self.input_uri))
        self.rows += len(table)
        if sum(len(frame) for frame in self.pending) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """One part per UTC date of the pending rows; on failure the rows stay pending and the error is raised."""
        if not self.pending:
            return
        rows = pd.concat(self.pending, ignore_index=True)
        for date, part in rows.groupby(rows["time"].dt.strftime("%Y-%m-%d"), sort=True):
            stamp = part["time"].iloc[0].strftime("%H%M%S")
            self.store.write(f"date={date}/{self.source}-{stamp}-{secrets.token_hex(4)}.parquet", _part(part))
        self.pending = []
        self.written += len(rows)

    def close(self) -> None:
        self.flush()


class BackgroundLog:
    """A :class:`PredictionLog` written by a daemon thread: ``append`` only stamps the rows and queues them."""

    def __init__(self, log: PredictionLog, flush_s: float = 10.0):
        self.log, self.flush_s = log, flush_s
        self.queue: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="xray-prediction-log", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def append(self, table: pd.DataFrame) -> None:
        if not table.empty:
            self.queue.put((table, datetime.now(timezone.utc)))

    def _take(self, item) -> None:
        table, now = item
        self.log.pending.append(log_rows(table, self.log.source, self.log.input_uri, now))
        self.log.rows += len(table)

    def _flush(self) -> None:
        try:
            self.log.flush()
        except Exception as error:  # storage down: keep the rows, serve on, say so
            logger.error(
                "prediction log %s: %d rows not written yet (%s); retrying at the next flush",
                without_credentials(self.log.root),
                sum(len(frame) for frame in self.log.pending),
                type(error).__name__,
            )

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            try:
                item = self.queue.get(timeout=max(0.05, self.flush_s - (time.monotonic() - last)))
            except queue.Empty:
                item = None
            with self.lock:
                if item is not None:
                    self._take(item)
                pending = sum(len(frame) for frame in self.log.pending)
                if pending and (pending >= self.log.flush_rows or time.monotonic() - last >= self.flush_s):
                    self._flush()
                    last = time.monotonic()
                elif not pending:
                    last = time.monotonic()

    def close(self) -> None:
        """Everything queued so far, written now (at exit too)."""
        with self.lock:
            while True:
                try:
                    self._take(self.queue.get_nowait())
                except queue.Empty:
                    break
            self._flush()


def from_environment(flush_rows: int = 1000, flush_s: float = 10.0) -> BackgroundLog | None:
    """Serving's log: ``XRAY_PREDICTION_LOG`` (a folder or an s3:// prefix), or none when unset or ``off``."""
    root = os.environ.get(ENVIRONMENT, "").strip()
    if not root or root == OFF:
        return None
    logger.info("serving logs every prediction to %s", without_credentials(root))
    return BackgroundLog(PredictionLog(root, "serving", flush_rows=flush_rows), flush_s=flush_s)


def read_log(root: str, start: datetime | None = None, end: datetime | None = None, store=None) -> pd.DataFrame:
    """Every logged row with ``start <= time < end`` (UTC), reading only the date partitions in range."""
    store = store if store is not None else open_store(root)
    parts = []
    for relative in store.list():
        date = relative.split("/", 1)[0].removeprefix("date=")
        if start is not None and date < start.strftime("%Y-%m-%d"):
            continue
        if end is not None and date > end.strftime("%Y-%m-%d"):
            continue
        parts.append(pq.read_table(io.BytesIO(store.read(relative)), schema=SCHEMA).to_pandas())
    if not parts:
        return pd.DataFrame(
            {name: pd.Series(dtype=field.type.to_pandas_dtype()) for name, field in zip(COLUMNS, SCHEMA)}
        )
    rows = pd.concat(parts, ignore_index=True)
    if start is not None:
        rows = rows[rows["time"] >= pd.Timestamp(start)]
    if end is not None:
        rows = rows[rows["time"] < pd.Timestamp(end)]
    return rows.sort_values("time", kind="stable").reset_index(drop=True)
