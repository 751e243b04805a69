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
            "status": "ok",
            "reason": "",
            "scope_unchecked": "",
            "study_instance_uid": "",
            "series_instance_uid": "",
            "sop_instance_uid": "",
            "site": "",
            "operating_point": "version",
            "model_version": "3",
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
