"""The node as a process (tests/node_process.py: the node of `run.py node` on a tiny model) fed by dcmtk's storescu:
``kill -9`` mid-study, a restart, the study's rest and a repeat sent again: every instance reported exactly once at
the loopback destination; SIGTERM finishes and prints the summary; no patient value in its logs, its spool records
or the prediction log. `run.py node` itself, on a registered champion, is tests/pipelines/test_local_stack_serving.py's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node_tools import Destination, no_sentinel_in, study, tree_text, uids
from support import ROOT, free_port
from xray.monitoring.prediction_log import read_log

pytestmark = pytest.mark.slow


def start(config: dict, log: Path, stderr: Path, **env: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "node_process.py"), json.dumps(config), str(log)],
        stdout=subprocess.PIPE,
        stderr=open(stderr, "ab"),
        text=True,
        env=os.environ | {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"} | env,
    )
    assert process.stdout.readline().strip() == "ready", stderr.read_text()[-3000:]
    return process


def storescu(port: int, files: list[Path], calling: str = "MODALITY") -> subprocess.CompletedProcess:
    command = ["storescu", "-aet", calling, "-aec", "XRAY_AI", "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def alive_children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` and that have not ended (not zombies)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def alive(pids: set[int]) -> set[int]:
    found = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.add(pid)
    return found


def wait_for(condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_kill_9_mid_study_then_a_restart_reports_every_instance_exactly_once(tmp_path):
    destination = Destination()
    files = []
    for index, data in enumerate(study(6)):
        files.append(tmp_path / f"image{index}.dcm")
        files[-1].write_bytes(data)
    port = free_port()
    config = {
        "port": port,
        "spool": str(tmp_path / "spool"),
        "stable_seconds": 3,
        "destinations": [destination.uri],
        "backoff_s": 0.2,
    }
    log, stderr = tmp_path / "log", tmp_path / "node.stderr"
    with destination.running():
        node = start(config, log, stderr)
        sent = storescu(port, files[:3])
        assert sent.returncode == 0, sent.stderr
        children = alive_children(node.pid)
        builders = {pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}
        assert len(builders) == 2  # the build processes (node.build_workers, 2 by default)
        node.send_signal(signal.SIGKILL)  # mid-study: three of six sent, none analysed yet
        node.wait(timeout=30)
        wait_for(lambda: not alive(children), 30)  # the build processes end with the node they served
        assert len(list((tmp_path / "spool").glob("studies/*/*.dcm"))) == 3 and not destination.received
        refused = storescu(port, files[:1])
        assert refused.returncode != 0  # nobody listens meanwhile
        node = start(config, log, stderr)
        sent = storescu(port, files[2:])  # the rest, with the third one again
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(destination.objects("SR")) == 6)
        again = storescu(port, files[:2])  # a sender repeats two after they were reported
        assert again.returncode == 0, again.stderr
        intruder = storescu(port, files[:1], calling="INTRUDER")
        assert intruder.returncode != 0 and "Calling AE Title Not Recognized" in intruder.stderr
        time.sleep(config["stable_seconds"] + 2)
        node.send_signal(signal.SIGTERM)
        out, _ = node.communicate(timeout=120)
    assert node.returncode == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["repeated_already_reported"] == 2 and summary["associations_rejected"] == 1
    reported = {
        report.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        for report in destination.objects("SR")
    }
    assert reported == {uids(path.read_bytes())[1] for path in files}
    assert all(len(items) == 1 for items in destination.received.values()), "a report was stored twice"
    rows = read_log(str(log))
    assert len(rows) == 6 and set(rows["sop_instance_uid"]) == reported
    assert not list((tmp_path / "spool").glob("studies/*/*.dcm"))  # pruned: the results are delivered
    assert "rejected: not in the allow list" in stderr.read_text()
    no_sentinel_in(stderr.read_text(), out, tree_text(tmp_path / "spool"), tree_text(log, skip_received=False))


def test_kill_9_inside_the_analysis_sends_nothing_early_and_the_restart_reports_each_instance_once(tmp_path):
    """Killed after the results are in the outbox and before the instances are marked done: nothing has left (results
    leave only once released), and the restart analyses the study again and sends each report once."""
    destination = Destination()
    files = []
    for index, data in enumerate(study(3)):
        files.append(tmp_path / f"image{index}.dcm")
        files[-1].write_bytes(data)
    port = free_port()
    config = {"port": port, "spool": str(tmp_path / "spool"), "stable_seconds": 1, "destinations": [destination.uri]}
    log, stderr = tmp_path / "log", tmp_path / "node.stderr"
    with destination.running():
        node = start(config, log, stderr, XRAY_TEST_PAUSE_BEFORE_DONE="600")
        assert storescu(port, files).returncode == 0
        wait_for(lambda: len(list((tmp_path / "spool").glob("outbox/*/*.dcm"))) == 3)
        time.sleep(2)  # the delivery thread has had its chances
        node.send_signal(signal.SIGKILL)
        node.wait(timeout=30)
        assert not destination.received and not list((tmp_path / "spool").glob("done/*/*"))
        node = start(config, log, stderr)
        wait_for(lambda: len(destination.objects("SR")) == 3)
        time.sleep(3)
        node.send_signal(signal.SIGTERM)
        out, _ = node.communicate(timeout=120)
    assert node.returncode == 0 and json.loads(out.strip().splitlines()[-1])["instances_reported"] == 3
    assert all(len(items) == 1 for items in destination.received.values()) and len(destination.received) == 3
    assert not list((tmp_path / "spool").glob("studies/*/*.dcm")) and not list((tmp_path / "spool").glob("outbox/*"))
    # The prediction log was written before the kill (it comes before the done mark): the restart logs the same
    # predictions again. Feedback joins a label to an image's latest prediction, so the pair counts once there
    # (docs/OPERATIONS.md, "After a crash", names this window).
    rows = read_log(str(log))
    assert len(rows) == 6 and rows.groupby("sop_instance_uid")["probability"].nunique().eq(1).all()
    assert set(rows["sop_instance_uid"]) == {uids(path.read_bytes())[1] for path in files}
