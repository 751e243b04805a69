"""Streamed batch inference: sources listed lazily, zip limits, bounded read-ahead, rows in input order, resume."""

import threading
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from fixtures.dicom_factory import radiograph
from support import jpeg_bytes, png, radiograph_like, write_zip
from xray.config.inference import InferenceConfig
from xray.config.limits import ArchiveLimits
from xray.errors import ArchiveError, DatasetSourceError
from xray.monitoring.prediction_log import PredictionLog, open_store, read_log
from xray.serving.batch import (
    PREDICTION_COLUMNS,
    PredictionWriter,
    Wanted,
    predict_source,
    predict_stream,
    read_output,
)
from xray.storage import listing, s3


def names(source: str, **kwargs) -> list[str]:
    return [ref.name for ref in listing.list_images(source, **kwargs)]


def test_an_empty_folder_a_broken_zip_and_a_missing_path_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetSourceError, match="no files found at"):
        names(str(tmp_path / "empty"))
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"junk")
    with pytest.raises(DatasetSourceError, match=r"no files found at .* \(only 1 system files\)"):
        names(str(tmp_path / "empty"))
    (tmp_path / "batch.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DatasetSourceError, match="is not a readable zip archive"):
        names(str(tmp_path / "batch.zip"))
    with pytest.raises(DatasetSourceError, match="not a folder, zip, file or s3:// prefix"):
        names(str(tmp_path / "missing"))


def test_a_zip_of_images_is_read_in_name_order(tmp_path):
    archive = write_zip(
        tmp_path / "b.zip",
        {
            "x/b.jpeg": jpeg_bytes(1),
            "x/a.png": jpeg_bytes(2, fmt="PNG"),
            "x/notes.txt": b"listed: its content says it is no image",
            "__MACOSX/x/._a.png": b"junk",
        },
    )
    skipped = Counter()
    refs = list(listing.list_images(str(archive), skipped=skipped))
    assert [ref.name for ref in refs] == [f"{archive}!x/a.png", f"{archive}!x/b.jpeg", f"{archive}!x/notes.txt"]
    assert skipped == {listing.JUNK: 1}
    assert refs[1].read() == jpeg_bytes(1)


@pytest.mark.parametrize(
    "entries, limits, message",
    [
        ({"../evil.jpeg": b"x"}, ArchiveLimits(), "path traversal"),
        ({"a.jpeg": b"x", "b.jpeg": b"y", "c.jpeg": b"z"}, ArchiveLimits(max_entries=2), "over max_entries=2"),
        ({"big.jpeg": b"\0" * 5000}, ArchiveLimits(max_entry_bytes=4000), "max_entry_bytes=4000"),
        ({"a.jpeg": b"\1" * 3000, "b.jpeg": b"\2" * 3000}, ArchiveLimits(max_total_bytes=5000), "max_total_bytes"),
        ({"bomb.jpeg": b"\0" * (3 * 2**20)}, ArchiveLimits(max_compression_ratio=10), "max_compression_ratio=10"),
    ],
)
def test_zip_input_is_held_to_the_training_archive_limits(tmp_path, entries, limits, message):
    archive = write_zip(tmp_path / "batch.zip", entries)
    with pytest.raises(ArchiveError, match=message):
        for ref in listing.list_images(str(archive), limits=limits):
            ref.read()


def images_folder(folder, count: int, unreadable=(3,)):
    folder.mkdir(exist_ok=True)
    for i in range(count):
        data = b"\xff\xd8\xff truncated" if i in unreadable else png(radiograph_like(np.random.default_rng(i), 40))
        (folder / f"{i:03d}.png").write_bytes(data)
    return folder


class Counted:
    """Refs that count how many were read: a stream must not read more than its window ahead of the writer."""

    def __init__(self, refs):
        self.refs, self.read, self.lock = list(refs), 0, threading.Lock()

    def __iter__(self):
        for ref in self.refs:
            yield listing.ImageRef(ref.name, self._counting(ref.read))

    def _counting(self, read):
        def wrapped():
            with self.lock:
                self.read += 1
            return read()

        return wrapped


def test_a_stream_longer_than_its_window_keeps_input_order_and_bounded_read_ahead(predictor, tmp_path):
    folder = images_folder(tmp_path / "in", 23)
    refs = Counted(listing.list_images(str(folder)))
    ahead = []

    class Watched(PredictionWriter):
        def write(self, table):
            ahead.append(refs.read - (self.rows + len(table)))
            super().write(table)

    window, batch = 4, 3
    with Watched(str(tmp_path / "out.csv")) as writer:
        result = predict_stream(predictor, refs, writer, batch_size=batch, workers=2, window=window)
    table = pd.read_csv(tmp_path / "out.csv")
    assert table["path"].tolist() == [str(folder / f"{i:03d}.png") for i in range(23)]
    assert list(table.columns) == PREDICTION_COLUMNS
    assert result.images == 23 and result.unreadable == 1 and writer.rows == 23
    assert table["status"][3] == "unreadable" and np.isnan(table["probability"][3]) and table["reason"][3]
    assert len(ahead) > 5 and max(ahead) <= window + 1, ahead
    # The same numbers as the one-request path serving uses.
    direct = predictor.predict_bytes([(folder / "000.png").read_bytes(), (folder / "022.png").read_bytes()])
    np.testing.assert_allclose(table["probability"].iloc[[0, 22]], direct["probability"].astype(float), atol=1e-6)
    assert table["status"].iloc[[0, 22]].tolist() == direct["status"].tolist()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_resume_predicts_only_images_not_yet_in_the_output(predictor, tmp_path, suffix):
    folder = images_folder(tmp_path / "in", 10)
    output = str(tmp_path / f"predictions{suffix}")
    settings = InferenceConfig(batch_size=4, fetch_workers=2, window=8)
    with PredictionWriter(output) as writer:
        predict_source(predictor, str(folder), settings, writer)
    first = pd.read_csv(output) if suffix == ".csv" else pd.read_parquet(output)
    images_folder(folder, 15)  # five more images; the first ten are the same bytes
    with PredictionWriter(output, resume=True) as writer:
        result = predict_source(predictor, str(folder), settings, writer)
    assert result.images == 15 and result.skipped == 10 and writer.rows == 5
    table = pd.read_csv(output) if suffix == ".csv" else pd.read_parquet(output)
    assert len(table) == 15 and table["sha256"].is_unique
    pd.testing.assert_frame_equal(table.iloc[:10].reset_index(drop=True), first, check_dtype=False)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_resume_of_an_output_written_before_the_detectors_scores_were_columns(predictor, tmp_path, suffix):
    """An output without content_z and acquisition_z (an earlier version's) is resumed: its rows kept; a CSV is
    appended to in its own columns (never rewritten: a failure mid-way would lose rows), a Parquet output is written
    anew beside it and moved over it, in today's; read_output reads either in today's columns."""
    folder = images_folder(tmp_path / "in", 6)
    output = str(tmp_path / f"predictions{suffix}")
    settings = InferenceConfig(batch_size=4, fetch_workers=2, window=8)
    with PredictionWriter(output) as writer:
        predict_source(predictor, str(folder), settings, writer)
    old = read_output(output).drop(columns=["content_z", "acquisition_z"]).iloc[:4]
    old.to_csv(output, index=False) if suffix == ".csv" else old.to_parquet(output, index=False)
    assert list(read_output(output).columns) == PREDICTION_COLUMNS
    with PredictionWriter(output, resume=True) as writer:
        result = predict_source(predictor, str(folder), settings, writer)
    assert result.skipped == 4 and writer.rows == 2
    table = read_output(output)
    assert list(table.columns) == PREDICTION_COLUMNS and len(table) == 6 and table["sha256"].is_unique
    assert table["content_z"].iloc[:4].isna().all()
    assert table["acquisition_z"].iloc[4:].notna().all() if suffix == ".parquet" else table["content_z"].isna().all()
    if suffix == ".csv":
        assert list(pd.read_csv(output, nrows=0).columns) == list(old.columns)


def test_a_run_that_stops_in_a_write_back_leaves_no_row_that_resume_would_skip_unwritten(predictor, tmp_path):
    """The PACS write-back (``on_batch``) fails on the second batch: the output holds only the rows of batches written
    back, so --resume hands every other image to the write-back again (xray.serving.sr asks the PACS what exists)."""
    folder = images_folder(tmp_path / "in", 10, unreadable=())
    output = str(tmp_path / "predictions.csv")
    settings = InferenceConfig(batch_size=4, fetch_workers=2, window=8)
    written_back = []

    def write_back(table, fail_on=None):
        if len(written_back) == fail_on:
            raise ConnectionError("the PACS went away mid-batch")
        written_back.append(table["path"].tolist())

    with pytest.raises(ConnectionError), PredictionWriter(output) as writer:
        predict_source(predictor, str(folder), settings, writer, wanted=Wanted(on_batch=lambda t: write_back(t, 1)))
    saved = pd.read_csv(output)["path"].tolist()
    assert saved == written_back[0] and len(saved) == 4  # the failed batch's rows are not saved
    with PredictionWriter(output, resume=True) as writer:
        result = predict_source(predictor, str(folder), settings, writer, wanted=Wanted(on_batch=write_back))
    assert result.skipped == 4 and writer.rows == 6
    every = [path for paths in written_back for path in paths]
    assert sorted(every) == sorted(pd.read_csv(output)["path"]) == [str(folder / f"{i:03d}.png") for i in range(10)]


def test_an_s3_prefix_streams_to_an_s3_output_and_resumes_there(predictor, tmp_path):
    server = s3.EmbeddedS3().start()
    try:
        client = s3.make_client(max_attempts=1)
        client.create_bucket(Bucket="batch")
        rng = np.random.default_rng(5)
        for i in range(7):
            client.put_object(Bucket="batch", Key=f"site/day1/{i}.png", Body=png(radiograph_like(rng, 40)))
        client.put_object(Bucket="batch", Key="site/day1/readme.txt", Body=b"not an image")
        # A PACS export: a DICOM object whose key is its SOP Instance UID, no extension.
        dicom = radiograph(radiograph_like(rng, 40)[..., 0], bits=12, syntax="jpeg-ls")
        client.put_object(Bucket="batch", Key="site/day2/1.2.826.0.1.3680043.9", Body=dicom)
        refs = list(listing.list_images("s3://batch/site/"))
        expected = [f"s3://batch/site/day1/{i}.png" for i in range(7)] + ["s3://batch/site/day1/readme.txt"]
        expected += ["s3://batch/site/day2/1.2.826.0.1.3680043.9"]
        assert [ref.name for ref in refs] == expected  # every file is listed: its content says what it is
        log = tmp_path / "log"
        with PredictionWriter("s3://batch/out/predictions.parquet", log=PredictionLog(str(log), "batch")) as writer:
            first = predict_stream(predictor, refs, writer)
        assert first.unreadable_reasons == {"not a recognised image format": 1} and not first.not_read
        # The run that wrote the output is named beside it, in the bucket: a resume finds its log rows there.
        assert client.get_object(Bucket="batch", Key="out/predictions.parquet.log-run")["Body"].read()
        with pytest.raises(FileNotFoundError):
            open_store("s3://batch/out").read("no-such.log-run")
        resumed_log = PredictionLog(str(log), "batch")
        with PredictionWriter("s3://batch/out/predictions.parquet", resume=True, log=resumed_log) as writer:
            again = predict_stream(predictor, listing.list_images("s3://batch/site/"), writer)
        assert again.skipped == 9 and writer.rows == 0 and writer.caught_up == 0
        assert len(read_log(str(log))) == 9 and read_log(str(log))["path"].is_unique
        client.download_file("batch", "out/predictions.parquet", str(tmp_path / "p.parquet"))
        table = pd.read_parquet(tmp_path / "p.parquet")
        assert len(table) == 9 and table["sop_instance_uid"].iloc[-1].startswith("1.2.")
        assert table["status"].iloc[-1] != "unreadable"
        with pytest.raises(DatasetSourceError, match="no files found"):
            names("s3://batch/nothing-here/")
    finally:
        server.stop()


def test_an_output_that_is_neither_csv_nor_parquet_is_refused(tmp_path):
    with pytest.raises(DatasetSourceError, match=".csv or .parquet"):
        PredictionWriter(str(tmp_path / "predictions.json"))


def test_monitoring_keeps_the_table_features_and_the_most_unusual_images(predictor, tmp_path):
    folder = images_folder(tmp_path / "in", 12, unreadable=())
    inverted = 255 - radiograph_like(np.random.default_rng(9), 40)
    (folder / "999.png").write_bytes(png(inverted))
    result = predict_source(predictor, str(folder), InferenceConfig(), wanted=Wanted(keep=True, examples=3))
    assert len(result.table) == 13 and len(result.features) == 13
    scores = [score for score, _, _ in result.examples]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert result.examples[0][1].endswith("999.png") and result.examples[0][2].mode == "RGB"


def test_nothing_in_a_folder_is_skipped_silently(predictor, tmp_path):
    """Files of every kind a site exports: each readable one is predicted, each other one is a row that says why,
    and the summary counts by reason what was not read (junk files included)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(6)
    grey = radiograph_like(rng)[..., 0]

    def encoded(fmt: str, pixels=grey) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        return buffer.getvalue()

    files = {
        "a.jpeg": encoded("JPEG"),
        "b.JPG": encoded("JPEG"),
        "c.tif": encoded("TIFF"),
        "d.bmp": encoded("BMP"),
        "e16.png": encoded("PNG", grey.astype(np.uint16) * 257),
        "f16.tif": encoded("TIFF", grey.astype(np.uint16) * 257),
        "one/image.jpeg": encoded("JPEG"),
        "two/image.jpeg": encoded("JPEG"),
        "no-extension": encoded("PNG"),
        "g.dcm": b"\0" * 128 + b"DICM" + b"\x02\x00" * 20,
        "h.dcm": radiograph(grey, bits=12),
        "one/1.2.840.99.7": radiograph(grey, bits=16, syntax="rle", voi="none"),
        "notes.txt": b"not an image",
        ".DS_Store": b"\0\0\0\1Bud1",
    }
    for name, data in files.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
    with PredictionWriter(str(tmp_path / "out.csv")) as writer:
        result = predict_source(predictor, str(tmp_path / "in"), InferenceConfig(), writer)
    summary = result.summary()
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert len(table) == 13 and table["path"].is_unique and writer.rows == 13
    names = table["path"].str.rsplit("/", n=1).str[-1]
    reasons = dict(zip(names, table["reason"]))
    assert reasons["g.dcm"] == "DICOM without pixel data: not an image"
    assert reasons["notes.txt"] == "not a recognised image format"
    # Only DICOM rows carry UIDs; the two made from the same pixels score as that JPEG does.
    dicom_rows = table[names.isin(["h.dcm", "1.2.840.99.7"])]
    assert (dicom_rows["sop_instance_uid"] != "").all() and (
        table.loc[names == "a.jpeg", "sop_instance_uid"] == ""
    ).all()
    jpeg = float(table.loc[names == "e16.png", "probability"].iloc[0])
    assert np.allclose(dicom_rows["probability"].astype(float), jpeg, atol=0.02)
    # Every file is counted once: a row (predicted, out of distribution or scope, or unreadable by reason) or skipped.
    assert summary["images"] == 13 and summary["unreadable"] == 2
    assert summary["unreadable_reasons"] == {"DICOM without pixel data": 1, "not a recognised image format": 1}
    assert summary["skipped"] == {"system file (.DS_Store, Thumbs.db, ._*, __MACOSX/)": 1}
    assert sum(summary["predicted"].values()) + summary["out_of_distribution"] + summary["out_of_scope"] == 11
    assert summary["images"] + sum(summary["skipped"].values()) == len(files)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_shards_split_a_source_by_name_and_their_merged_rows_equal_one_run(predictor, tmp_path, suffix):
    from xray.serving.batch import combine_summaries as combined
    from xray.serving.batch import merge_outputs, shard_of, shard_output

    folder = images_folder(tmp_path / "in", 13)
    settings = InferenceConfig(batch_size=4, fetch_workers=2, window=8)
    single = str(tmp_path / f"one{suffix}")
    with PredictionWriter(single) as writer:
        predict_source(predictor, str(folder), settings, writer)
    output = str(tmp_path / f"sharded{suffix}")
    parts, summaries = [], []
    for shard in range(3):
        parts.append(shard_output(output, shard, 3))
        with PredictionWriter(parts[-1]) as writer:
            result = predict_source(predictor, str(folder), settings, writer, shard=(shard, 3))
        summaries.append(result.summary() | {"rows_written": writer.rows})
    assert parts[1] == str(tmp_path / f"sharded.part-1-of-3{suffix}") and shard_output(output, 0, 1) == output
    assert merge_outputs(parts, output) == 13 == combined(summaries)["images"] == combined(summaries)["rows_written"]
    read = (lambda p: pd.read_csv(p, keep_default_na=False)) if suffix == ".csv" else pd.read_parquet
    one, merged = read(single), read(output)
    by_name = lambda t: numeric(t.sort_values("path").reset_index(drop=True))  # noqa: E731
    # The model's batches differ between one run and a shard (4 images, or fewer at a shard's end), and oneDNN's
    # kernels with them: a probability may move in its 8th digit. Compared as numbers, to float32's precision.
    pd.testing.assert_frame_equal(by_name(merged), by_name(one), check_dtype=False, rtol=1e-6)
    # Every file in exactly one shard, the same one whatever the listing's order.
    owners = {path: shard_of(path, 3) for path in one["path"]}
    assert {shard: sum(1 for s in owners.values() if s == shard) for shard in range(3)} == {
        shard: len(read(part)) for shard, part in enumerate(parts)
    }
    assert [shard_of(path, 3) for path in sorted(owners, reverse=True)] == [
        owners[p] for p in sorted(owners, reverse=True)
    ]
    # Resume per shard: a rerun of one shard predicts nothing again.
    with PredictionWriter(parts[0], resume=True) as writer:
        again = predict_source(predictor, str(folder), settings, writer, shard=(0, 3))
    assert again.skipped == again.images == len(read(parts[0])) and writer.rows == 0


def numeric(table: pd.DataFrame) -> pd.DataFrame:
    """A CSV read without NA parsing holds "" for a missing number: its numeric columns as numbers again. (pandas 3
    reads text as its string dtype, not object: tested as "any string column", or nothing was converted and the
    tolerance below compared digits as text.)"""
    for column in table.columns:
        if pd.api.types.is_string_dtype(table[column]):
            values = pd.to_numeric(table[column].replace("", np.nan), errors="coerce")
            if values.notna().sum() == (table[column] != "").sum() and values.notna().any():
                table[column] = values
    return table
