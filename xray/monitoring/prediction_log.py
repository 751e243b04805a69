"""The prediction log: every answer of batch inference and of serving, kept for when the labels come back.

One Parquet dataset, partitioned by UTC date: ``<root>/date=YYYY-MM-DD/<source>-<run>-<HHMMSS>-<random>.parquet``, one
part per flush, never rewritten (so writers never contend: each batch run and each serving worker writes its own parts;
``run`` names the writer, and a batch run's is kept beside its output so that ``--resume`` finds its parts).
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
import hashlib
import io
import json
import logging
import os
import secrets
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xray.environment import process_running
from xray.errors import DatasetSourceError
from xray.storage import s3

logger = logging.getLogger(__name__)

OFF = "off"
ENVIRONMENT = "XRAY_PREDICTION_LOG"
SPOOL_ENVIRONMENT = "XRAY_PREDICTION_LOG_SPOOL"  # where serving spools rows (default: the temp folder)
SOURCES = ("batch", "serving", "node")
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
        ("runtime", pa.string()),  # rows logged before it was a column read back empty
        ("content_z", pa.float64()),  # the detector's two scores: rows logged before they were columns read back NaN
        ("acquisition_z", pa.float64()),
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
        try:
            return self.client.get_object(Bucket=self.location.bucket, Key=self._key(relative))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(relative) from None


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
    if "time" in table.columns and now is None:  # rows stamped when they were answered (a spool)
        rows["time"] = pd.to_datetime(table["time"], utc=True, format="ISO8601")
    else:
        rows["time"] = pd.Timestamp(now or datetime.now(timezone.utc))
    rows["source"] = source
    rows["input"] = without_credentials(input_uri)
    for column in COLUMNS[3:]:
        rows[column] = table[column] if column in table.columns else None
    for field in SCHEMA:
        if pa.types.is_string(field.type) and field.name not in ("source", "input"):
            rows[field.name] = rows[field.name].fillna("").astype(str)
        elif pa.types.is_floating(field.type):  # a CSV output's rows come back as text
            rows[field.name] = pd.to_numeric(rows[field.name], errors="coerce")
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
        self.run = secrets.token_hex(4)
        """Names this writer's parts; a resumed batch takes its output's back (:meth:`follow`)."""
        self.logged: set[str] = set()
        """Keys (:func:`row_keys`) of rows a resumed run's earlier runs logged: not logged again."""

    def append(self, table: pd.DataFrame) -> None:
        if self.logged and not table.empty:
            table = table[~row_keys(table).isin(self.logged).to_numpy()]
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
            self.store.write(
                f"date={date}/{self.source}-{self.run}-{stamp}-{secrets.token_hex(4)}.parquet", _part(part)
            )
        self.pending = []
        self.written += len(rows)

    def close(self) -> None:
        self.flush()

    def follow(self, beside, name: str, resume: bool, previous: pd.DataFrame | None) -> int:
        """Tie this log to a batch's output: ``name`` in ``beside`` (a store at the output's folder) holds the run that
        writes the output. A new output takes this log's run. A resumed one takes its run back: the rows its earlier
        runs logged are read from their parts and not logged again (an output lost with its process is predicted
        again), and the rows of ``previous`` (the output so far) that never reached the log are logged now, once.
        Returns how many were logged now."""
        if not resume:
            beside.write(name, self.run.encode())
            return 0
        try:
            self.run = beside.read(name).decode().strip()
        except FileNotFoundError:  # a new output, or one written before runs were named (logged when it closed)
            beside.write(name, self.run.encode())
            return 0
        mine = [p for p in self.store.list() if p.rsplit("/", 1)[-1].startswith(f"{self.source}-{self.run}-")]
        parts = [pq.read_table(io.BytesIO(self.store.read(p)), schema=SCHEMA).to_pandas() for p in mine]
        self.logged = set(row_keys(pd.concat(parts))) if parts else set()
        before = self.rows
        if previous is not None and len(previous):
            self.append(previous)
            self.flush()
        if self.rows > before:
            logger.info(
                "resume: %d predictions of the output were not in the prediction log: logged now", self.rows - before
            )
        return self.rows - before


def row_keys(table: pd.DataFrame) -> pd.Series:
    """What identifies a batch row in its output and in the log: the image's sha256 and its path in the input."""
    return table["sha256"].fillna("").astype(str) + "\0" + table["path"].fillna("").astype(str)


class BackgroundLog:
    """A :class:`PredictionLog` that never makes a request wait on storage.

    ``append`` (in the request's thread) writes the answer's rows to a local spool file, one JSON line per row; a
    daemon thread turns the spool into a part every ``flush_rows`` rows or ``flush_s`` seconds, and at exit. A server
    that ends its worker with a signal (uvicorn re-raises SIGTERM after its graceful shutdown, so no exit handler
    runs) loses nothing: the next BackgroundLog on the same log (any worker, any restart) first writes the spools
    that ended processes left. A part that cannot be written stays spooled for the next flush, said in one line.
    """

    def __init__(self, log: PredictionLog, flush_s: float = 10.0, spool: str | Path | None = None):
        self.log, self.flush_s = log, flush_s
        folder = Path(spool or os.environ.get(SPOOL_ENVIRONMENT) or Path(tempfile.gettempdir()) / "xray-prediction-log")
        self.spool_dir = folder / hashlib.sha256(log.root.encode()).hexdigest()[:12]
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"{log.source}-{os.getpid()}-{secrets.token_hex(4)}"
        self.spool = self.spool_dir / f"{self.prefix}.jsonl"
        self.spooled, self.rotations = 0, 0
        self.lock, self.write_lock, self.wake = threading.Lock(), threading.Lock(), threading.Event()
        self.recover()
        self.thread = threading.Thread(target=self._run, name="xray-prediction-log", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def append(self, table: pd.DataFrame, **columns) -> None:
        """The rows of one answer (and ``columns``: one value per row each, e.g. ``sha256``), spooled now."""
        if table.empty:
            return
        stamp = datetime.now(timezone.utc).isoformat()
        records = table[[c for c in COLUMNS[3:] if c in table.columns]].to_dict("records")
        for name, values in columns.items():
            for record, value in zip(records, values):
                record[name] = value
        text = "".join(json.dumps({"time": stamp, **record}, default=str) + "\n" for record in records)
        with self.lock:
            try:
                with open(self.spool, "a") as handle:
                    handle.write(text)
            except OSError:  # the spool's disk: said, and serving goes on
                logger.exception("prediction log: %d rows could not be spooled", len(records))
                return
            self.spooled += len(records)
            self.log.rows += len(records)
        if self.spooled >= self.log.flush_rows:
            self.wake.set()

    def _write_spool(self, path: Path) -> int:
        """One part from a spool file, which is removed once the part is written."""
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records:
            self.log.pending = [log_rows(pd.DataFrame.from_records(records), self.log.source, self.log.input_uri)]
            try:
                self.log.flush()
            finally:
                self.log.pending = []
        path.unlink(missing_ok=True)
        return len(records)

    def recover(self) -> None:
        """The spools of processes that ended before they flushed, written to the log now."""
        for path in sorted(self.spool_dir.glob("*.jsonl")):
            try:
                pid = int(path.name.split("-")[1])
            except (ValueError, IndexError):
                continue
            if process_running(pid):
                continue  # its own thread writes it
            rows = self._write_spool(path)
            if rows:
                logger.info("prediction log: %d rows left by an ended process (pid %d) written", rows, pid)

    def _flush(self) -> None:
        """The spool, moved aside under the lock (requests go on into a new one) and written outside it."""
        with self.write_lock:
            with self.lock:
                if self.spooled:
                    self.rotations += 1
                    self.spool.replace(self.spool_dir / f"{self.prefix}.{self.rotations}.jsonl")
                    self.spooled = 0
            for path in sorted(self.spool_dir.glob(f"{self.prefix}.*.jsonl")):
                try:
                    self._write_spool(path)
                except Exception as error:  # storage down: the rows stay spooled, serve on, say so
                    logger.error(
                        "prediction log %s: rows not written yet (%s); retrying at the next flush",
                        without_credentials(self.log.root),
                        type(error).__name__,
                    )
                    return

    def _run(self) -> None:
        while True:
            self.wake.wait(timeout=self.flush_s)
            self.wake.clear()
            self._flush()

    def close(self) -> None:
        """Everything spooled so far, written now (at exit too); the spool's folders go when nothing is left."""
        self._flush()
        atexit.unregister(self.close)
        for folder in (self.spool_dir, self.spool_dir.parent):
            try:
                folder.rmdir()
            except OSError:  # not empty: another worker's spool, or rows not written yet
                break


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
    rows["runtime"] = rows["runtime"].fillna("")
    if start is not None:
        rows = rows[rows["time"] >= pd.Timestamp(start)]
    if end is not None:
        rows = rows[rows["time"] < pd.Timestamp(end)]
    return rows.sort_values("time", kind="stable").reset_index(drop=True)
