"""The prediction log: parts per date, read back by range, written in the background, never losing rows."""

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from xray.errors import DatasetSourceError
from xray.monitoring import prediction_log
from xray.monitoring.prediction_log import BackgroundLog, PredictionLog, read_log


def rows(n: int, start: int = 0, **values) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "path": [f"NORMAL/{i}.jpeg" for i in range(start, start + n)],
            "sha256": [f"{i:064x}" for i in range(start, start + n)],
            "probability": [i / (start + n) for i in range(start, start + n)],
            "label": ["PNEUMONIA"] * n,
            "threshold": 0.5,
            "ood_score": 0.2,
            "content_z": -0.4,
            "acquisition_z": 0.3,
            "status": "ok",
            "reason": "",
            "scope_unchecked": "",
            "study_instance_uid": "",
            "series_instance_uid": "",
            "sop_instance_uid": "",
            "site": "",
            "operating_point": "version",
            "model_version": "3",
            "runtime": "keras f32",
        }
    )
    return table.assign(**values)


def test_rows_round_trip_with_their_columns_and_nothing_else(tmp_path):
    log = PredictionLog(str(tmp_path), "batch", "https://user:secret@pacs.example/dicom-web?token=abc")
    log.append(rows(5).assign(extra_column="not logged"))
    log.close()
    back = read_log(str(tmp_path))
    assert list(back.columns) == prediction_log.COLUMNS and len(back) == 5
    assert back["sha256"].tolist() == rows(5)["sha256"].tolist()
    assert (back["source"] == "batch").all() and (back["model_version"] == "3").all()
    # Credentials and query strings never reach the log.
    assert set(back["input"]) == {"https://pacs.example/dicom-web"}
    assert str(back["time"].dt.tz) == "UTC"


def test_one_part_per_flush_and_per_date_and_a_read_by_range(tmp_path):
    log = PredictionLog(str(tmp_path), "batch", flush_rows=4)
    log.append(rows(3))
    assert log.written == 0  # below flush_rows: still in memory
    log.append(rows(3, start=3))
    assert log.written == 6
    old = datetime.now(timezone.utc) - timedelta(days=9)
    log.pending.append(prediction_log.log_rows(rows(2, start=10), "batch", now=old))
    log.close()
    parts = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet"))
    assert len(parts) == 2 and parts[0].startswith(f"date={old:%Y-%m-%d}/batch-"), parts
    assert len(read_log(str(tmp_path))) == 8
    recent = read_log(str(tmp_path), start=old + timedelta(days=1))
    assert len(recent) == 6 and not recent["sha256"].isin(rows(2, start=10)["sha256"]).any()
    assert len(read_log(str(tmp_path), end=old + timedelta(seconds=1))) == 2


def test_a_part_written_before_the_detectors_scores_were_columns_reads_back_without_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    earlier = pa.schema([f for f in prediction_log.SCHEMA if f.name not in ("content_z", "acquisition_z")])
    logged = prediction_log.log_rows(rows(3), "batch")
    (tmp_path / "date=2026-11-30").mkdir()
    pq.write_table(pa.Table.from_pandas(logged[earlier.names], schema=earlier), tmp_path / "date=2026-11-30/a.parquet")
    back = read_log(str(tmp_path))
    assert list(back.columns) == prediction_log.COLUMNS and len(back) == 3
    assert back["content_z"].isna().all() and back["acquisition_z"].isna().all() and (back["ood_score"] == 0.2).all()


def test_an_empty_log_reads_as_an_empty_table_with_the_columns(tmp_path):
    back = read_log(str(tmp_path / "nothing yet"))
    assert back.empty and list(back.columns) == prediction_log.COLUMNS


class FailingStore:
    def __init__(self):
        self.failures, self.parts = 1, []

    def write(self, relative, data):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("storage down")
        self.parts.append(relative)


def test_a_failed_write_keeps_its_rows_for_the_next_flush():
    store = FailingStore()
    log = PredictionLog("memory", "batch", store=store)
    log.append(rows(3))
    with pytest.raises(ConnectionError):
        log.flush()
    assert sum(len(frame) for frame in log.pending) == 3
    log.flush()
    assert log.written == 3 and len(store.parts) == 1


def test_the_background_log_writes_off_the_request_path_and_survives_a_storage_outage(tmp_path, caplog):
    store = FailingStore()
    log = PredictionLog("memory", "serving", store=store, flush_rows=2)
    background = BackgroundLog(log, flush_s=0.05, spool=tmp_path)
    background.append(rows(3))
    # The first flush fails (logged, rows kept); a later one writes them.
    deadline = datetime.now() + timedelta(seconds=10)
    while not store.parts and datetime.now() < deadline:
        background.thread.join(0.05)
    assert store.parts, "the background thread wrote the rows after the outage"
    assert "rows not written yet (ConnectionError)" in caplog.text
    background.append(rows(1, start=7))
    background.close()
    assert background.log.written == 4 and background.log.rows == 4


def test_serving_logs_where_the_environment_says(monkeypatch, tmp_path):
    monkeypatch.delenv(prediction_log.ENVIRONMENT, raising=False)
    assert prediction_log.from_environment() is None
    monkeypatch.setenv(prediction_log.ENVIRONMENT, "off")
    assert prediction_log.from_environment() is None
    monkeypatch.setenv(prediction_log.ENVIRONMENT, str(tmp_path / "log"))
    monkeypatch.setenv(prediction_log.SPOOL_ENVIRONMENT, str(tmp_path / "spool"))
    background = prediction_log.from_environment()
    background.append(rows(2))
    background.close()
    assert len(read_log(str(tmp_path / "log"))) == 2
    assert not list((tmp_path / "spool").rglob("*.jsonl")), "a closed log leaves no spool"


def test_rows_of_a_worker_killed_before_its_flush_are_written_by_the_next_one(tmp_path):
    """uvicorn ends a worker by re-raising SIGTERM (no exit handler runs): its spool survives it."""
    import subprocess
    import sys

    script = (
        "import sys, time, pandas as pd; sys.path.insert(0, sys.argv[3]);"
        "from test_prediction_log import rows;"
        "from xray.monitoring.prediction_log import BackgroundLog, PredictionLog;"
        "log = BackgroundLog(PredictionLog(sys.argv[1], 'serving'), flush_s=3600, spool=sys.argv[2]);"
        "log.append(rows(3)); time.sleep(0.5); import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    )
    here = str(Path(__file__).parent)
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "log"), str(tmp_path / "spool"), here])
    assert killed.returncode == -9 and read_log(str(tmp_path / "log")).empty
    assert len(list((tmp_path / "spool").rglob("*.jsonl"))) == 1
    # The next worker on the same log (a restart, or another worker) writes them before anything else.
    BackgroundLog(PredictionLog(str(tmp_path / "log"), "serving"), spool=tmp_path / "spool").close()
    back = read_log(str(tmp_path / "log"))
    assert back["sha256"].tolist() == rows(3)["sha256"].tolist() and (back["source"] == "serving").all()
    assert not list((tmp_path / "spool").rglob("*.jsonl"))


def test_an_unsupported_log_location_is_one_clear_error():
    with pytest.raises(DatasetSourceError, match="a folder or an s3:// prefix"):
        prediction_log.open_store("https://user:pw@example.com/log")


# ---------------------------------------------------------------------------------------------------------------
# A batch's rows: logged as each batch is written, and once after a crash and --resume


def logged_paths(root) -> pd.Series:
    """How many times each image is in the log."""
    return read_log(str(root)).groupby("path").size()


def crashed(output: str, root, batches: list[pd.DataFrame], logged: int, resume: bool = False) -> None:
    """A batch run killed (kill -9) after writing ``batches`` to ``output``, of which the first ``logged`` reached the
    log: the last ones were written to the output, and the process died before their part was (the writer is never
    closed, as in a killed process)."""
    from xray.serving.batch import PredictionWriter

    writer = PredictionWriter(output, resume=resume, log=PredictionLog(str(root), "batch", "/in"))
    for number, table in enumerate(batches):
        if number == logged:
            writer.log = None  # the process dies between the output's write and the log's
        writer.write(table)
    if writer.format == "csv":
        writer._csv.close()  # what the kernel keeps of a killed process's flushed writes


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_each_written_batch_is_in_the_log_before_the_next_is_predicted(tmp_path, suffix):
    from xray.serving.batch import PredictionWriter

    writer = PredictionWriter(str(tmp_path / f"out{suffix}"), log=PredictionLog(str(tmp_path / "log"), "batch", "/in"))
    writer.write(rows(4))
    assert logged_paths(tmp_path / "log").sum() == 4, "in the log as soon as it is written, not at the end"
    writer.write(rows(4, start=4))
    assert logged_paths(tmp_path / "log").sum() == 8
    writer.close()
    assert (logged_paths(tmp_path / "log") == 1).all() and len(logged_paths(tmp_path / "log")) == 8


def test_after_a_kill_resume_logs_what_was_predicted_but_not_logged_once(tmp_path):
    from xray.serving.batch import PredictionWriter

    output, root = str(tmp_path / "out.csv"), tmp_path / "log"
    crashed(output, root, [rows(4), rows(4, start=4), rows(4, start=8)], logged=2)
    assert logged_paths(root).sum() == 8, "the third batch is in the output, not in the log"
    with PredictionWriter(output, resume=True, log=PredictionLog(str(root), "batch", "/in")) as writer:
        assert writer.caught_up == 4 and writer.done == set(rows(12)["sha256"])
        writer.write(rows(4, start=12))  # what the resumed run predicts
    counts = logged_paths(root)
    assert len(counts) == 16 and (counts == 1).all(), counts[counts != 1]
    # A second resume finds everything logged.
    with PredictionWriter(output, resume=True, log=PredictionLog(str(root), "batch", "/in")) as writer:
        assert writer.caught_up == 0


def test_an_output_lost_with_its_process_is_predicted_again_and_not_logged_twice(tmp_path):
    """A Parquet output is finished when its writer closes: killed, it is lost, and --resume predicts everything
    again. The rows its run logged are not logged again; the others are."""
    from xray.serving.batch import PredictionWriter

    output, root = str(tmp_path / "out.parquet"), tmp_path / "log"
    crashed(output, root, [rows(4), rows(4, start=4)], logged=2)
    assert not (tmp_path / "out.parquet").exists() and logged_paths(root).sum() == 8
    with PredictionWriter(output, resume=True, log=PredictionLog(str(root), "batch", "/in")) as writer:
        assert writer.done == set()
        for start in (0, 4, 8):
            writer.write(rows(4, start=start))
    counts = logged_paths(root)
    assert len(counts) == 12 and (counts == 1).all(), counts[counts != 1]


def test_a_new_run_to_the_same_output_logs_its_predictions_again(tmp_path):
    """Without --resume a run's predictions are new ones (another day, another version): logged, whatever an
    earlier run to that output logged."""
    from xray.serving.batch import PredictionWriter

    output, root = str(tmp_path / "out.csv"), tmp_path / "log"
    for _ in range(2):
        with PredictionWriter(output, log=PredictionLog(str(root), "batch", "/in")) as writer:
            writer.write(rows(4))
    assert (logged_paths(root) == 2).all()
