"""Batch inference as one stream: list -> fetch -> screen -> predict -> write, in bounded memory.

Images come from a folder, a zip (under the same size and ratio limits as training archives) or an S3 prefix
(paginated listing, parallel GETs with the client's retries). A pool of threads fetches, hashes, decodes, screens and
computes the out-of-distribution features of a bounded window of images ahead of the model; the model decodes,
resizes and predicts each batch in one compiled call; rows are written as they come (CSV or Parquet, local or s3://). Memory
depends on the window and the batch size, not on the number of images.

Unreadable images never abort a batch: they get a row with a status that says why. With ``resume``, images whose
content hash is already in the output are not predicted again. Every batch of rows reaches the prediction log as it is
written (a killed run loses at most the batch in hand), and a resumed run logs what was predicted but not logged, once
(:meth:`xray.monitoring.prediction_log.PredictionLog.follow`).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import logging
import os
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from xray import CLASS_NAMES
from xray.config.inference import InferenceConfig
from xray.config.limits import ArchiveLimits
from xray.errors import ArchiveError, DatasetSourceError, SourceUnavailable
from xray.monitoring.ood import OUT_OF_DISTRIBUTION
from xray.monitoring.prediction_log import open_store
from xray.monitoring.scope import OUT_OF_SCOPE
from xray.serving.explain import candidates_to_explain, choose_to_explain
from xray.serving.predictor import NUMERIC_COLUMNS, OUTPUT_COLUMNS, PreparedImage
from xray.storage import s3
from xray.storage.listing import ImageRef, list_images

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["path", "sha256", *OUTPUT_COLUMNS]
OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet"}


def in_order(function: Callable, items: Iterable, workers: int, window: int) -> Iterator:
    """``function(item)`` for each item on a pool of threads, in input order, with at most ``window`` in flight.

    The source is consumed lazily, so an unbounded listing never sits in memory.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xray-fetch") as pool:
        pending: deque = deque()
        iterator = iter(items)
        for item in iterator:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------------------------
# Writing


class PredictionWriter:
    """Rows appended as they are predicted, to a CSV or Parquet file, local or s3://.

    An s3:// output is written to a local file and uploaded when the writer closes, also after a failure, so a
    rerun with resume finds what was done. Parquet gets one row group per write.
    """

    def __init__(self, output: str, resume: bool = False, max_attempts: int = 5, log=None):
        suffix = PurePosixPath(output).suffix.lower()
        if suffix not in OUTPUT_FORMATS:
            raise DatasetSourceError(f"predictions output must end in .csv or .parquet, got {output}")
        self.output, self.format, self.rows, self.log = output, OUTPUT_FORMATS[suffix], 0, None
        self._client = s3.make_client(max_attempts) if output.startswith("s3://") else None
        self._spool = tempfile.mkdtemp(prefix="xray-predictions-") if self._client else None
        self.local = Path(self._spool, f"predictions{suffix}") if self._client else Path(output).expanduser()
        self.local.parent.mkdir(parents=True, exist_ok=True)
        previous = self._previous(full=log is not None) if resume else None
        self.done = set(previous["sha256"].dropna()) - {""} if previous is not None else set()
        self._parquet = None
        if self.format == "csv":
            keep = previous is not None and self.local.is_file()
            self._columns = list(pd.read_csv(self.local, nrows=0).columns) if keep else PREDICTION_COLUMNS
            if self._columns != PREDICTION_COLUMNS:  # an earlier version's output: appended to, never rewritten
                logger.warning("resume: %s has an earlier version's columns; new rows keep them", self.output)
            self._csv = open(self.local, "a" if keep else "w", newline="")
            if not keep:
                self._csv.write(",".join(PREDICTION_COLUMNS) + "\n")
        elif previous is not None and len(previous):
            self.write(previous.reindex(columns=PREDICTION_COLUMNS))
        self.rows = 0
        # xray.monitoring.prediction_log.PredictionLog: every new row is logged, each batch as it is written; the run
        # that writes this output is named beside it, so that a resume logs what an earlier run did not (``follow``).
        self.log, self.caught_up = log, 0
        if log is not None:
            beside = open_store(output.rsplit("/", 1)[0] if self._client else str(self.local.parent), max_attempts)
            self.caught_up = log.follow(beside, f"{PurePosixPath(output).name}.log-run", resume, previous)

    def _previous(self, full: bool = False) -> pd.DataFrame | None:
        if self._client is not None:
            from botocore.exceptions import ClientError  # lazy: only S3 access needs botocore

            location = s3.parse_s3_uri(self.output)
            try:
                self._client.download_file(location.bucket, location.key, str(self.local))
            except ClientError:
                return None
        if not self.local.is_file():
            return None
        columns = ["sha256"] if self.format == "csv" and not full else None
        read_csv = lambda: pd.read_csv(self.local, usecols=columns, dtype=str, keep_default_na=False)  # noqa: E731
        table = read_csv() if self.format == "csv" else pd.read_parquet(self.local)
        logger.info("resume: %d images already in %s", len(table), self.output)
        return table

    def write(self, table: pd.DataFrame) -> None:
        if table.empty:
            return
        table = table[PREDICTION_COLUMNS]
        if self.format == "csv":
            table.reindex(columns=self._columns, fill_value="").to_csv(self._csv, header=False, index=False)
            self._csv.flush()
        else:
            batch = pa.Table.from_pandas(table.astype(_PARQUET_TYPES), schema=_parquet_schema(), preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(str(self.local) + ".partial", _parquet_schema())
            self._parquet.write_table(batch)
        self.rows += len(table)
        if self.log is not None:
            self.log.append(table)
            self.log.flush()

    def close(self) -> None:
        """The output first, then the log's last part (a log that cannot be written fails the run, output safe)."""
        if self.format == "csv":
            self._csv.close()
        elif self._parquet is not None:
            self._parquet.close()
            os.replace(str(self.local) + ".partial", self.local)
        elif not self.local.is_file():
            pd.DataFrame(columns=PREDICTION_COLUMNS).astype(_PARQUET_TYPES).to_parquet(self.local, index=False)
        if self._client is not None:
            location = s3.parse_s3_uri(self.output)
            try:
                self._client.upload_file(str(self.local), location.bucket, location.key)
            except Exception:
                logger.error("predictions not uploaded to %s: they are kept in %s", self.output, self.local)
                raise
            shutil.rmtree(self._spool, ignore_errors=True)
        if self.log is not None:
            self.log.close()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_PARQUET_TYPES = dict.fromkeys(PREDICTION_COLUMNS, "string") | dict.fromkeys(NUMERIC_COLUMNS, "float64")


def _parquet_schema():
    types = {"string": pa.string(), "float64": pa.float64()}
    return pa.schema([(name, types[kind]) for name, kind in _PARQUET_TYPES.items()])


# ---------------------------------------------------------------------------------------------------------------
# The stream


@dataclass
class StreamResult:
    """What a streamed run did; ``table`` and ``features`` only when asked to keep them (monitoring)."""

    images: int = 0
    skipped: int = 0
    """Images already in the output (resume)."""
    not_read: Counter = field(default_factory=Counter)
    """Files seen but given no row, by reason: operating-system junk, a PACS's non-image instances."""
    unreadable: int = 0
    unreadable_reasons: Counter = field(default_factory=Counter)
    """Rows with status unreadable, by the kind of reason (:func:`reason_kind`): each file is counted once."""
    out_of_distribution: int = 0
    out_of_scope: int = 0
    predicted: dict = field(default_factory=dict)
    seconds: float = 0.0
    table: pd.DataFrame | None = None
    features: list = field(default_factory=list)
    examples: list = field(default_factory=list)
    """(ood_score, path, RGB thumbnail) of the highest-scoring readable images, highest first."""
    to_explain: list = field(default_factory=list)
    """The rows most worth a Grad-CAM look (:func:`choose_to_explain`), when asked for."""

    def summary(self) -> dict:
        return {
            "images": self.images,
            "skipped_already_predicted": self.skipped,
            "skipped": dict(sorted(self.not_read.items())),
            "unreadable": self.unreadable,
            "unreadable_reasons": dict(sorted(self.unreadable_reasons.items())),
            "out_of_distribution": self.out_of_distribution,
            "out_of_scope": self.out_of_scope,
            "predicted": dict(sorted(self.predicted.items())),
            "images_per_second": round((self.images - self.skipped) / self.seconds, 2) if self.seconds else None,
        }


@dataclass
class _Item:
    name: str
    sha256: str = ""
    skipped: bool = False
    prepared: object = None


_DEFAULTS = InferenceConfig()


def merge_outputs(parts: list[str], output: str, max_attempts: int = 5) -> int:
    """The shards' outputs (CSV or Parquet, local or s3://) as one file at ``output``, in shard order; the parts are
    kept (a rerun with resume reads them). Returns the rows written."""
    with PredictionWriter(output, resume=False, max_attempts=max_attempts) as writer:
        for part in parts:
            writer.write(read_output(part, max_attempts))
        return writer.rows


def read_output(output: str, max_attempts: int = 5) -> pd.DataFrame:
    """A predictions file (CSV or Parquet, local or s3://) as written by :class:`PredictionWriter`."""
    with tempfile.TemporaryDirectory(prefix="xray-part-") as folder:
        local = Path(output).expanduser()
        if output.startswith("s3://"):
            location = s3.parse_s3_uri(output)
            local = Path(folder, PurePosixPath(location.key).name)
            s3.make_client(max_attempts).download_file(location.bucket, location.key, str(local))
        if OUTPUT_FORMATS[local.suffix.lower()] == "csv":
            table = pd.read_csv(local, keep_default_na=False, dtype=str)
            return table.reindex(columns=PREDICTION_COLUMNS, fill_value="").replace("", None)
        return pd.read_parquet(local).reindex(columns=PREDICTION_COLUMNS)


def combine_summaries(summaries: list[dict]) -> dict:
    """The shards' summaries as one: counts added, the rest from the first shard, each shard's rate kept."""
    total = dict(summaries[0])
    for key, value in summaries[0].items():
        if isinstance(value, int) and not isinstance(value, bool):
            total[key] = sum(s[key] for s in summaries)
        elif isinstance(value, dict) and all(isinstance(v, int) for v in value.values()):
            names = sorted({name for s in summaries for name in s[key]})
            total[key] = {n: sum(s[key].get(n, 0) for s in summaries) for n in names}
    total["images_per_second"] = [s["images_per_second"] for s in summaries]
    return total


def shard_of(name: str, shards: int) -> int:
    """Which of ``shards`` a listed file belongs to: a hash of its name in the listing, so every run (and every
    resume) splits a source the same way, whatever order the listing comes in."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % shards


def shard_output(output: str, shard: int, shards: int) -> str:
    """Where shard ``shard`` of ``shards`` writes its rows: beside ``output`` (``preds.part-1-of-4.csv``)."""
    if shards == 1:
        return output
    path = PurePosixPath(output)
    return str(path.with_name(f"{path.stem}.part-{shard}-of-{shards}{path.suffix}"))


@dataclass(frozen=True)
class Wanted:
    """What a stream keeps beside the rows it writes: the table and the out-of-distribution features (``keep``), the
    thumbnails of the ``examples`` most unusual images, ``explain`` rows for Grad-CAM, and ``on_batch``, called with
    each batch's rows before they are written (the PACS write-back: a row saved is a row written back)."""

    keep: bool = False
    examples: int = 0
    explain: int = 0
    on_batch: Callable[[pd.DataFrame], None] | None = None


def predict_source(
    predictor,
    source: str,
    settings: InferenceConfig,
    writer: PredictionWriter | None = None,
    *,
    limits: ArchiveLimits | None = None,
    max_attempts: int = 5,
    wanted: Wanted = Wanted(),
    shard: tuple[int, int] = (0, 1),
) -> StreamResult:
    """Every file of ``source`` (folder, zip, s3:// prefix or dicomweb://) through :func:`predict_stream` with
    ``settings``; the listing's junk files (and a PACS's non-image instances) are counted with the files that were
    not read. ``shard`` (i, n): only the files :func:`shard_of` puts in share i of n."""
    junk = Counter()
    predictor.use_limits(settings.decode)
    refs = list_images(source, limits, max_attempts=max_attempts, skipped=junk, pacs=settings.pacs)
    index, shards = shard
    if shards > 1:
        refs = (ref for ref in refs if shard_of(ref.name, shards) == index)
    result = predict_stream(
        predictor,
        refs,
        writer,
        batch_size=settings.batch_size,
        workers=settings.fetch_workers,
        window=settings.window,
        wanted=wanted,
    )
    result.not_read.update(junk)
    if junk:
        logger.info("not listed: %s", dict(junk))
    return result


def predict_stream(
    predictor,
    refs: Iterable[ImageRef],
    writer: PredictionWriter | None = None,
    *,
    batch_size: int = _DEFAULTS.batch_size,
    workers: int = _DEFAULTS.fetch_workers,
    window: int = _DEFAULTS.window,
    wanted: Wanted = Wanted(),
    progress_every: int = 1000,
) -> StreamResult:
    """Predict every image of ``refs`` in order and write each batch's rows as soon as it is predicted.

    ``writer.done`` (content hashes) are skipped. ``wanted`` (:class:`Wanted`): ``keep`` also returns the table and
    the out-of-distribution features (monitoring's drift test; about 4 KB per image); ``examples`` thumbnails of the
    images with the highest ood_score; ``explain`` rows for Grad-CAM (:func:`choose_to_explain`), from candidates kept
    in bounded memory as the batches pass; ``on_batch`` with each batch before it is written (:mod:`xray.serving.sr`).
    """
    keep, examples, explain, on_batch = wanted.keep, wanted.examples, wanted.explain, wanted.on_batch
    done = writer.done if writer is not None else set()
    result, started = StreamResult(), time.perf_counter()
    tables, worst = [], []
    candidates = pd.DataFrame(columns=PREDICTION_COLUMNS)

    def prepare(ref: ImageRef) -> _Item:
        item = _Item(ref.name)
        try:
            data = ref.read()
        except (ArchiveError, SourceUnavailable):
            raise
        except (DatasetSourceError, OSError) as error:
            # One object that cannot be read after the client's retries: a row that says why, not a lost batch.
            item.prepared = _unreadable(f"cannot be read: {error}".splitlines()[0][:200])
            return item
        item.sha256 = hashlib.sha256(data).hexdigest()
        if item.sha256 in done:
            item.skipped = True
            return item
        item.prepared = predictor.prepare(data)
        return item

    batch: list[_Item] = []

    def flush() -> None:
        nonlocal candidates
        if not batch:
            return
        readable = [item for item in batch if item.prepared.readable]
        table = predictor.table([item.prepared for item in batch])
        table.insert(0, "sha256", [item.sha256 or None for item in batch])
        table.insert(0, "path", [item.name for item in batch])
        mask = np.array([item.prepared.readable for item in batch])
        # The batch's write-back first, its rows after: a run that stops in between leaves rows that --resume predicts
        # again, never rows saved without their objects in the PACS (which asks the PACS what it already holds).
        if on_batch is not None:
            on_batch(table)
        if writer is not None:
            writer.write(table)
        result.unreadable += int((~mask).sum())
        result.unreadable_reasons.update(reason_kind(i.prepared.reason) for i in batch if not i.prepared.readable)
        result.out_of_distribution += int((table["status"] == OUT_OF_DISTRIBUTION).sum())
        result.out_of_scope += int((table["status"] == OUT_OF_SCOPE).sum())
        for label in CLASS_NAMES:
            count = int((table.loc[table["status"] == "ok", "label"] == label).sum())
            result.predicted[label] = result.predicted.get(label, 0) + count
        if keep:
            tables.append(table)
            result.features.extend(item.prepared.features for item in readable)
        if explain:
            candidates = candidates_to_explain(pd.concat([candidates, table], ignore_index=True), explain)
        if examples:
            # A thumbnail only for an image that enters the top ``examples``, from the bytes the batch still holds.
            for item, score in zip(readable, table.loc[mask, "ood_score"].to_numpy(dtype=float)):
                score = float(np.nan_to_num(score, nan=-np.inf))
                if len(worst) < examples:
                    heapq.heappush(worst, (score, item.name, _thumbnail(item.prepared.encoded)))
                elif score > worst[0][0]:
                    heapq.heapreplace(worst, (score, item.name, _thumbnail(item.prepared.encoded)))
        batch.clear()

    for item in in_order(prepare, refs, workers, window):
        result.images += 1
        if item.skipped:
            result.skipped += 1
        else:
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        if progress_every and result.images % progress_every == 0:
            rate = result.images / (time.perf_counter() - started)
            logger.info("%d images (%d already predicted), %.1f images/s", result.images, result.skipped, rate)
    flush()
    result.seconds = time.perf_counter() - started
    if result.unreadable:
        logger.warning(
            "%d of %d images unreadable: %s", result.unreadable, result.images, dict(result.unreadable_reasons)
        )
    if keep:
        result.table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=PREDICTION_COLUMNS)
    result.examples = [(score, name, picture) for score, name, picture in sorted(worst, key=lambda e: -e[0])]
    result.to_explain = choose_to_explain(candidates, explain) if explain else []
    return result


def reason_kind(reason: str) -> str:
    """What an unreadable file's reason comes to, for counting: the decoder's message up to its details ("multi-frame DICOM",
    "not a recognised image format", "empty file (0 bytes)", "cannot decode", "cannot be read")."""
    return reason.split(":")[0]


def _unreadable(reason: str) -> PreparedImage:
    return PreparedImage(reason=reason)


def _thumbnail(data: bytes, size: int = 256):
    with Image.open(io.BytesIO(data)) as image:
        picture = image.convert("RGB")
        picture.thumbnail((size, size))
        return picture
