"""The DICOM node (xray/serving/node/): what a C-STORE is answered, the spool, the analysis of stable studies once per
instance and model version, results to a loopback Storage SCP, triage, a new champion, dead letters; no patient value
in a log, a spool record or the prediction log. Senders are pynetdicom and dcmtk's echoscu; the node runs in this
process on the test predictors (conftest)."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_tools import dciodvfy_errors, dsrdump
from fixtures.dicom_factory import radiograph, with_sentinels
from node_tools import Destination, no_sentinel_in, send, some_jpegs, study, tree_text, uids
from support import free_port
from xray.config.node import NodeConfig
from xray.monitoring.prediction_log import PredictionLog, read_log
from xray.serving.node import scp, spool
from xray.serving.node.service import Node

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def config(tmp_path: Path, **changes) -> NodeConfig:
    base = {"spool": str(tmp_path / "spool"), "port": free_port(), "stable_seconds": 2, "backoff_s": 0}
    base["build_workers"] = 0  # built in the analysis thread; the build processes: the triage test and the process's
    return NodeConfig.model_validate(base | changes)


def receiver(tmp_path: Path, **changes) -> scp.Receiver:
    settings = config(tmp_path, **changes)
    return scp.Receiver(spool.Spool(settings.spool, int(settings.max_spool_gb * spool.GB)), settings, lambda: "7")


def spooled(root: Path) -> list[Path]:
    return sorted(root.glob("studies/*/*.dcm"))


# -- what a C-STORE is answered --


def test_a_kept_instance_is_synced_to_the_spool_before_success(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    node = receiver(tmp_path)
    (data,) = study(1)
    assert node.store(data, DX, 0) == scp.SUCCESS
    (path,) = spooled(Path(node.spool.root))
    assert path.read_bytes() == data
    assert str(path.with_name(f".{path.name}.partial")) in synced and str(path.parent) in synced
    study_uid, instance_uid = uids(data)
    assert path == node.spool.path(study_uid, instance_uid) and study_uid not in str(path)
    assert node.counts["stored"] == 1 and node.spool.size == len(data)


def test_other_classes_and_instances_outside_the_rules_are_acknowledged_counted_and_not_kept(tmp_path):
    node = receiver(tmp_path)
    ct = with_sentinels(get_testdata_file("CT_small.dcm"))
    lateral = radiograph(some_jpegs(1)[0], view="LL")
    ct_modality = radiograph(some_jpegs(1)[0], modality="CT")
    assert node.store(ct, CT, 0) == scp.SUCCESS
    assert node.store(lateral, DX, 0) == scp.SUCCESS
    assert node.store(ct_modality, DX, 0) == scp.SUCCESS
    assert not spooled(node.spool.root)
    assert node.counts == {"other_class_dropped": 1, "outside_rules_view": 1, "outside_rules_modality": 1}


def test_a_truncated_file_is_a_failure_status_and_nothing_is_kept(tmp_path, caplog):
    node = receiver(tmp_path)
    (data,) = study(1)
    assert node.store(data[:-5000], DX, 0) == scp.CANNOT_UNDERSTAND
    assert node.store(data[:400], DX, 0) == scp.CANNOT_UNDERSTAND
    assert not spooled(node.spool.root) and node.counts["refused_unreadable"] == 2
    no_sentinel_in(caplog.text)


def test_a_full_spool_or_disk_is_out_of_resources_never_a_crash(tmp_path, monkeypatch):
    first, second = study(2)
    node = receiver(tmp_path, max_spool_gb=(len(first) + 100) / spool.GB)
    assert node.store(first, DX, 0) == scp.SUCCESS
    assert node.store(second, DX, 0) == scp.OUT_OF_RESOURCES
    assert node.store(first, DX, 0) == scp.SUCCESS  # a repeat replaces its own copy: no more room needed

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "write_synced", full)
    node.spool.max_bytes = 10 * spool.GB
    assert node.store(second, DX, 0) == 0xA700
    assert len(spooled(node.spool.root)) == 1 and node.counts["refused_out_of_resources"] == 2


def test_urgent_studies_come_first_then_the_oldest(tmp_path):
    store = spool.Spool(tmp_path / "spool", spool.GB)
    old, urgent, new = (study(1)[0] for _ in range(3))
    for data, is_urgent in ((old, False), (urgent, True), (new, False)):
        store.store(data, *uids(data), urgent=is_urgent)
        time.sleep(0.02)
    order = [s.key for s in store.stable(0)]
    assert order == [spool.key(uids(d)[0]) for d in (urgent, old, new)]
    assert store.stable(3600) == []


# -- over the network: dcmtk's echoscu and pynetdicom as senders --


def test_echo_allow_list_and_a_truncated_file_mid_association(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    node = receiver(tmp_path, allow=["MODALITY"])
    server = scp.serve(node.config, node)
    try:
        port = str(node.config.port)
        echo = subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", "XRAY_AI", "127.0.0.1", port], timeout=60)
        assert echo.returncode == 0
        refused = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "XRAY_AI", "127.0.0.1", port], timeout=60)
        assert refused.returncode != 0
        good = study(2)
        assert send(node.config.port, good, calling="INTRUDER") is None
        assert send(node.config.port, good, called="ANOTHER_AI") is None
        assert "'INTRUDER' at 127.0.0.1" in caplog.text and node.counts["associations_rejected"] == 3
        assert not spooled(node.spool.root)
        truncated, whole = tmp_path / "truncated.dcm", tmp_path / "whole.dcm"
        truncated.write_bytes(good[0][:-3000])
        whole.write_bytes(good[1])
        from pynetdicom import AE

        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
        ae.add_requested_context(DX, pydicom.uid.ExplicitVRLittleEndian)
        association = ae.associate("127.0.0.1", node.config.port, ae_title="XRAY_AI")
        statuses = [int(association.send_c_store(item).Status) for item in (truncated, whole)]
        association.release()
        assert statuses == [scp.CANNOT_UNDERSTAND, scp.SUCCESS]
        assert len(spooled(node.spool.root)) == 1 and node.counts["echoes"] == 1
    finally:
        server.shutdown()
    no_sentinel_in(caplog.text)


def test_every_transfer_syntax_the_decode_path_reads_is_kept_and_high_priority_marks_the_study_urgent(tmp_path):
    node = receiver(tmp_path)
    server = scp.serve(node.config, node)
    syntaxes = ("implicit", "deflated", "rle", "jpeg-lossless", "jpeg-ls", "jpeg2000-lossless", "jpeg2000")
    try:
        jpeg = some_jpegs(1)[0]
        files = [radiograph(jpeg, bits=12, syntax=syntax) for syntax in syntaxes]
        files.append(radiograph(jpeg, bits=8, syntax="jpeg-baseline"))
        assert send(node.config.port, files) == [scp.SUCCESS] * len(files)
        urgent = study(1)
        assert send(node.config.port, urgent, priority=1) == [scp.SUCCESS]
    finally:
        server.shutdown()
    assert len(spooled(node.spool.root)) == len(files) + 1
    first = node.spool.stable(0)[0]
    assert first.urgent and first.key == spool.key(uids(urgent[0])[0])


# -- the node: stable studies analysed once, results out, restarts --


def test_results_leave_without_nagles_delay(tmp_path, monkeypatch):
    """Each C-STORE writes its command, then its dataset, then waits: without TCP_NODELAY the dataset waits for the
    peer's delayed acknowledgement, about 40 ms a file (xray.serving.node.results.without_nagle)."""
    from xray.serving.node import results

    seen = []
    original = results.without_nagle

    def spy(association):
        original(association)
        seen.append(association.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(results, "without_nagle", spy)
    files = [tmp_path / f"{index}.dcm" for index in range(3)]
    for index, path in enumerate(files):
        path.write_bytes(radiograph(np.full((64, 64), 40 * index, np.uint8), bits=8, PatientID=f"P{index}"))
    destination = Destination()
    with destination.running():
        sent = []
        results.c_store(("RESULTS", "127.0.0.1", destination.port), files, "XRAY_AI", sent.append)
    assert seen and all(seen) and sent == files and len(destination.objects()) == 3


def make_node(tmp_path, predictor, destination, **changes) -> Node:
    settings = config(tmp_path, destinations=[destination.uri], **changes)
    log = PredictionLog(str(tmp_path / "log"), "node")
    return Node(settings, predictor, "chest-xray-classifier", log=log)


def thread_built(node: Node) -> Node:
    """``node`` with one thread standing in for its build processes: the pipelined order without spawning any (the
    spawned ones: the triage test and the killed-builder test)."""
    node.pool = ThreadPoolExecutor(1)
    return node


def single_studies(count: int) -> list[bytes]:
    """``count`` studies of one instance each, in order."""
    return [data for _ in range(count) for data in study(1)]


def test_a_stable_study_is_reported_once_per_instance_also_when_repeated_and_after_a_restart(
    tmp_path, predictor, caplog
):
    caplog.set_level(logging.DEBUG)
    destination = Destination()
    files = study(3)
    with destination.running():
        node = make_node(tmp_path, predictor, destination)
        for data in files:
            assert node.receiver.store(data, DX, 0) == scp.SUCCESS
        assert node.step(now=time.time()) == 0  # not stable yet
        assert node.step(now=time.time() + 3) == 1
        reports = destination.objects("SR")
        sources = {
            r.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0]
            .ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID
            for r in reports
        }
        assert sources == {uids(d)[1] for d in files}
        assert not spooled(node.spool.root) and node.spool.size == 0  # pruned once delivered
        # A sender repeats the study: acknowledged, not kept, not reported again; nor by a restarted node.
        assert [node.receiver.store(d, DX, 0) for d in files] == [scp.SUCCESS] * 3
        assert node.receiver.counts["repeated_already_reported"] == 3
        node.log.close()
        again = make_node(tmp_path, predictor, destination)
        assert again.step(now=time.time() + 3) == 0
    assert all(len(items) == 1 for items in destination.received.values()) and len(destination.received) == 3
    log = read_log(str(tmp_path / "log"))
    assert len(log) == 3 and set(log["source"]) == {"node"} and set(log["sop_instance_uid"]) == sources
    assert set(log["model_version"]) == {"7"}
    no_sentinel_in(caplog.text, tree_text(tmp_path / "spool"), tree_text(tmp_path / "log", skip_received=False))


def test_with_build_processes_a_batch_is_built_while_the_next_is_predicted_and_each_recorded_once(
    tmp_path, predictor, monkeypatch
):
    """The pipelined analysis (``build_workers``): a batch's results are built while the next batch is predicted, and
    it is recorded (outbox, log, done) only then; the step ends with nothing in hand. A thread pool stands in for the
    build processes (the spawned ones: the triage test)."""
    from xray.serving.node import service

    monkeypatch.setattr(service, "BATCH", 1)  # a batch per instance: three studies of one, three batches
    events = []
    predict = predictor.predict_bytes

    def predicting(images):
        events.append(("predict", len(events)))
        return predict(images)

    monkeypatch.setattr(predictor, "predict_bytes", predicting)
    destination = Destination()
    files = single_studies(3)
    with destination.running():
        node = thread_built(make_node(tmp_path, predictor, destination))
        recorded = node.record
        monkeypatch.setattr(node, "record", lambda: (events.append(("record", len(node.in_hand))), recorded()))
        for data in files:
            node.receiver.store(data, DX, 0)
        assert node.step(now=time.time() + 3) == 3
        node.pool.shutdown()
    # Predicted, predicted, recorded the first (the second in hand), ...: never more than two batches in hand.
    assert [kind for kind, _ in events] == ["predict", "predict", "record", "predict", "record", "record"]
    assert max(count for kind, count in events if kind == "record") == 2 and not node.in_hand
    assert len(destination.objects("SR")) == 3 and all(len(items) == 1 for items in destination.received.values())
    assert len(read_log(str(tmp_path / "log"))) == 3 and node.counts["instances_reported"] == 3
    assert len(list((tmp_path / "spool" / "done" / "7").iterdir())) == 3


def test_a_failed_build_leaves_its_batch_unreported_and_the_next_step_analyses_it_again(
    tmp_path, predictor, monkeypatch, caplog
):
    from xray.serving.node import results

    build = results.build_one
    failures = iter([True])

    def failing_once(*job):
        if next(failures, False):
            raise ValueError("the build failed")
        return build(*job)

    monkeypatch.setattr(results, "build_one", failing_once)
    destination = Destination()
    files = study(2)
    with destination.running():
        node = thread_built(make_node(tmp_path, predictor, destination))
        for data in files:
            node.receiver.store(data, DX, 0)
        with pytest.raises(ValueError, match="the build failed"):
            node.step(now=time.time() + 3)
        assert not node.in_hand and not destination.objects() and node.counts["instances_reported"] == 0
        assert node.step(now=time.time() + 3) == 1  # the batch again, whole: each instance once
        node.pool.shutdown()
    assert len(destination.objects("SR")) == 2 and all(len(items) == 1 for items in destination.received.values())
    assert len(read_log(str(tmp_path / "log"))) == 2


def test_a_failed_prediction_records_the_batch_already_built_and_leaves_only_its_own_to_the_next_step(
    tmp_path, predictor, monkeypatch
):
    from xray.serving.node import service

    monkeypatch.setattr(service, "BATCH", 1)
    predict, calls = predictor.predict_bytes, []

    def failing_second(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("the model failed")
        return predict(images)

    monkeypatch.setattr(predictor, "predict_bytes", failing_second)
    destination = Destination()
    files = single_studies(2)
    with destination.running():
        node = thread_built(make_node(tmp_path, predictor, destination))
        for data in files:
            node.receiver.store(data, DX, 0)
        with pytest.raises(RuntimeError, match="the model failed"):
            node.step(now=time.time() + 3)
        assert not node.in_hand and node.counts["instances_reported"] == 1  # the first, built, is recorded
        node.step(now=time.time() + 3)
        assert calls == [1, 1, 1]  # the next step predicts only the instance the failure held
        node.pool.shutdown()
    assert len(destination.objects("SR")) == 2 and all(len(items) == 1 for items in destination.received.values())
    log = read_log(str(tmp_path / "log"))
    assert len(log) == 2 and log["sop_instance_uid"].is_unique


@pytest.mark.slow
def test_a_build_process_ignores_the_groups_signals_and_one_killed_is_replaced_its_batch_reported_once(
    tmp_path, predictor, caplog
):
    """Ctrl-C or a service manager signals the whole process group: the build processes ignore it (the node finishes
    the batches in hand, then ends them). One killed (the out-of-memory killer, say) breaks the pool: new ones, and
    the batch it held is analysed again, each instance reported once."""
    import signal
    from concurrent.futures.process import BrokenProcessPool

    destination = Destination()
    first, second = study(1), study(2)
    with destination.running():
        node = make_node(tmp_path, predictor, destination, build_workers=1)
        node.pool.submit(abs, 0).result()  # started
        (builder,) = list(node.pool._processes)  # noqa: SLF001 - the test signals it
        for number in (signal.SIGINT, signal.SIGTERM):
            os.kill(builder, number)
        node.receiver.store(first[0], DX, 0)
        assert node.step(now=time.time() + 3) == 1 and list(node.pool._processes) == [builder]  # noqa: SLF001
        os.kill(builder, signal.SIGKILL)
        time.sleep(0.01)
        for data in second:
            node.receiver.store(data, DX, 0)
        with pytest.raises(BrokenProcessPool):
            node.step(now=time.time() + 3)
        assert "a build process ended unexpectedly; starting 1 new ones" in caplog.text
        assert node.step(now=time.time() + 3) == 1 and builder not in node.pool._processes  # noqa: SLF001
        node.pool.shutdown()
    assert len(destination.objects("SR")) == 3 and all(len(items) == 1 for items in destination.received.values())
    assert len(read_log(str(tmp_path / "log"))) == 3


@pytest.mark.slow
def test_a_build_that_hangs_does_not_hold_the_stop(tmp_path, predictor, monkeypatch, caplog):
    from xray.serving.node import results

    released = threading.Event()
    started = threading.Event()

    def hanging(*job):
        started.set()
        released.wait(60)
        raise RuntimeError("released")

    monkeypatch.setattr(results, "build_one", hanging)
    destination = Destination()
    try:
        with destination.running():
            node = thread_built(make_node(tmp_path, predictor, destination, stable_seconds=0.2))
            node.start()
            node.receiver.store(study(1)[0], DX, 0)
            assert started.wait(30)
            clock = time.monotonic()
            node.stop(timeout_s=1)
            assert time.monotonic() - clock < 20  # not the hung build's 60 s
        assert "the analysis did not finish in 1 s; stopping without it" in caplog.text
        assert not destination.received and node.counts["instances_reported"] == 0
    finally:
        released.set()


@pytest.mark.slow
def test_a_node_that_cannot_listen_ends_the_build_processes_it_started(tmp_path, predictor):
    destination = Destination()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = make_node(tmp_path, predictor, destination, build_workers=1, port=taken.getsockname()[1])
        with pytest.raises(OSError):
            node.start()
    with pytest.raises(RuntimeError, match="after shutdown"):
        node.pool.submit(abs, 0)


@pytest.mark.slow
def test_heatmaps_triage_and_the_webhook_with_the_study_uid_and_probability_only(
    tmp_path, explainable_predictor, monkeypatch
):
    posted = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    monkeypatch.setenv("XRAY_ALERT_WEBHOOK", f"http://127.0.0.1:{hook.server_port}/hook")
    destination = Destination()
    files = study(2)
    try:
        with destination.running():
            node = make_node(
                tmp_path, explainable_predictor, destination, heatmaps=True, urgent_threshold=0.0, build_workers=1
            )
            for data in files:
                node.receiver.store(data, DX, 0)
            node.step(now=time.time() + 3)
            node.pool.shutdown()
    finally:
        hook.shutdown()
    assert len(destination.objects("SR")) == len(destination.objects("SEG")) == len(destination.objects("OT")) == 2
    for number, report in enumerate(destination.objects("SR")):
        group = report.ContentSequence[-1].ContentSequence[0]
        codes = {item.ConceptNameCodeSequence[0].CodeValue: item for item in group.ContentSequence}
        assert codes["XR-TRIAGE"].ConceptCodeSequence[0].CodeValue == "XR-URGENT"
        path = tmp_path / f"report{number}.dcm"
        report.save_as(path, enforce_file_format=True)
        assert not dciodvfy_errors(path), dciodvfy_errors(path)  # the urgent mark keeps the report valid
        dumped = dsrdump(path)
        assert dumped.returncode == 0 and 'CODE:(,,"Triage")=(XR-URGENT,99XRAY,"Urgent")' in dumped.stdout
    study_uid = uids(files[0])[0]
    assert len(posted) == 2 and all(set(p) == {"text"} and study_uid in p["text"] for p in posted)
    assert all(p["text"].split(study_uid)[1].strip().startswith("P(pneumonia) 0.") for p in posted)
    no_sentinel_in(json.dumps(posted))
    # Not urgent under a threshold no probability reaches: no mark, no post.
    assert node.counts["urgent"] == 2


def test_a_new_champion_is_picked_up_between_studies(tmp_path, predictor, explainable_predictor):
    from xray.serving.predictor import ChestXrayPredictor

    newer = ChestXrayPredictor(explainable_predictor.model, 0.5, 32, "8")
    answers = [None, newer]
    destination = Destination()
    with destination.running():
        node = make_node(tmp_path, predictor, destination, reload_s=0.001)
        node.load = lambda current: answers.pop(0) if answers else None
        first = study(1)
        node.receiver.store(first[0], DX, 0)
        node.step(now=time.time() + 3)
        second = study(1)
        time.sleep(0.01)
        node.receiver.store(second[0], DX, 0)
        node.step(now=time.time() + 3)
    by_source = {
        r.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID: r.SeriesDescription
        for r in destination.objects("SR")
    }
    assert by_source == {
        uids(first[0])[1]: "AI result: chest-xray-classifier v7",
        uids(second[0])[1]: "AI result: chest-xray-classifier v8",
    }
    assert node.counts["reloads"] == 1
    log = read_log(str(tmp_path / "log"))
    assert sorted(log["model_version"]) == ["7", "8"]


def test_with_a_batch_in_hand_a_new_champion_waits_for_its_record_and_sends_nothing_before_its_done_mark(
    tmp_path, predictor, explainable_predictor, monkeypatch
):
    """The batch in hand is recorded before the registry is asked (its results wait for no new model); the instance
    the old version reported and delivered is analysed again by the new one, whose results stay held (the old
    release is withdrawn) until the new version marks it done."""
    from xray.serving.node import service
    from xray.serving.predictor import ChestXrayPredictor

    monkeypatch.setattr(service, "BATCH", 1)
    newer = ChestXrayPredictor(explainable_predictor.model, 0.5, 32, "8")
    answers, in_hand_when_asked, released_when_done = [None, newer], [], []
    destination = Destination()
    files = single_studies(2)
    with destination.running():
        node = thread_built(make_node(tmp_path, predictor, destination, reload_s=0.001))
        node.load = lambda current: (in_hand_when_asked.append(len(node.in_hand)), answers.pop(0) if answers else None)[
            1
        ]
        mark = node.spool.mark_done

        def marking(version, key):
            released_when_done.append([p for p in node.spool.waiting() if p.parent.name == key])
            mark(version, key)

        monkeypatch.setattr(node.spool, "mark_done", marking)
        for data in files:
            node.receiver.store(data, DX, 0)
        node.step(now=time.time() + 3)  # the first study by v7, the second by v8
        node.step(now=time.time() + 3)  # the first again, by v8
        node.pool.shutdown()
    assert in_hand_when_asked and not any(in_hand_when_asked)
    assert len(released_when_done) == 3 and not any(released_when_done)
    assert sorted(r.SeriesDescription for r in destination.objects("SR")) == [
        "AI result: chest-xray-classifier v7",
        "AI result: chest-xray-classifier v8",
        "AI result: chest-xray-classifier v8",
    ]


def test_results_a_destination_refuses_become_dead_letters_and_go_out_at_the_next_start(tmp_path, predictor, caplog):
    destination = Destination()
    destination.status = 0xA700
    files = study(2)
    with destination.running():
        node = make_node(tmp_path, predictor, destination, attempts=2)
        for data in files:
            node.receiver.store(data, DX, 0)
        node.step(now=time.time() + 3)
    assert node.sender.dead_letters == 2 and not destination.received
    assert len(list((tmp_path / "spool" / "dead-letter").rglob("*.dcm"))) == 2
    assert not spooled(tmp_path / "spool")  # the dead letters carry the results; the images go
    assert "try 2 of 2 failed (C-STORE status 0xA700); kept as dead letters" in caplog.text
    destination.status = 0x0000
    with destination.running():
        again = make_node(tmp_path, predictor, destination)
        assert again.spool.revive() == 2
        again.deliver()
    assert len(destination.objects("SR")) == 2 and not list((tmp_path / "spool").rglob("*.dcm"))


def test_the_node_config_and_its_messages():
    with pytest.raises(ValueError, match="is not an AE title"):
        NodeConfig(allow=["A" * 17])
    with pytest.raises(ValueError, match="a destination is dicom://AE@HOST:PORT"):
        NodeConfig(destinations=["http://example.org"])
    with pytest.raises(ValueError, match="unknown storage class"):
        NodeConfig(rules={"sop_classes": ["CTImageStorage"]})
    assert NodeConfig(destinations=["dicom://PACS@10.0.0.2:104", "dicomweb://127.0.0.1:8042/dicom-web"])


def test_the_prediction_log_reads_the_node_rows_like_any_other(tmp_path):
    log = PredictionLog(str(tmp_path), "node")
    log.append(pd.DataFrame({"probability": [0.3], "status": ["ok"], "sop_instance_uid": ["1.2.3"]}))
    log.close()
    assert read_log(str(tmp_path))["source"].tolist() == ["node"]


def test_stable_studies_are_analysed_in_batches_of_whole_studies():
    from xray.serving.node.service import BATCH, batches

    def made(size: int) -> spool.Study:
        return spool.Study(str(size), tuple(Path(f"{size}-{i}.dcm") for i in range(size)), False, 0.0)

    studies = [made(n) for n in (2, 3, BATCH - 5, 1, BATCH + 4, 2)]
    grouped = batches(studies)
    assert [[len(s.files) for s in group] for group in grouped] == [[2, 3, BATCH - 5], [1], [BATCH + 4], [2]]
    assert [s for group in grouped for s in group] == studies  # the order (urgent first, then oldest) is kept


def test_the_process_loads_the_champion_and_a_newer_one_only_when_the_alias_moved(monkeypatch):
    from types import SimpleNamespace

    from infra import node as process

    holder = {"champion": "3"}
    loaded = []

    class Predictor:
        def __init__(self, version):
            self.version = version

        def use_runtime(self, runtime):
            self.runtime = runtime

        def use_limits(self, limits):
            self.limits = limits

    def resolve(name, requested):
        return SimpleNamespace(version=holder.get(requested, requested))

    def load(name, version):
        loaded.append(version)
        return Predictor(version), None

    monkeypatch.setattr(process.store, "resolve_version", resolve)
    monkeypatch.setattr(process.store, "load_predictor", load)
    first, newer = process.loader("chest-xray-classifier", "champion", "keras", None)
    assert first.version == "3" and first.runtime == "keras" and newer("3") is None
    holder["champion"] = "4"
    assert newer("3").version == "4" and loaded == ["3", "4"]
    pinned, never = process.loader("chest-xray-classifier", "3", "keras", None)
    assert never("3") is None and pinned.version == "3"


def test_a_destination_that_fails_midway_gets_each_result_once(tmp_path, predictor):
    destination = Destination()
    destination.accept = 1
    files = study(2)
    with destination.running():
        node = make_node(tmp_path, predictor, destination, attempts=1)
        for data in files:
            node.receiver.store(data, DX, 0)
        node.step(now=time.time() + 3)
        assert len(destination.received) == 1 and node.sender.dead_letters == 1
        destination.accept = None
        destination.status = 0x0000
        assert node.spool.revive() == 1
        node.deliver()
    assert len(destination.received) == 2 and all(len(items) == 1 for items in destination.received.values())


@pytest.mark.slow
def test_a_build_process_imports_no_model_framework_plots_or_scikit_learn():
    """What a build process imports as it starts (the node's pool initializer's module, spawned, so a fresh
    interpreter): the report and image builders with pydicom and highdicom, never TensorFlow, Keras, MLflow, ZenML,
    scikit-learn or pyplot, which it never runs and which cost seconds at each node start and each renewal."""
    import sys

    code = "import sys, xray.serving.node.results; print(' '.join(sys.modules))"
    modules = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    loaded = {name.split(".")[0] for name in modules}
    assert {"highdicom", "pydicom"} <= loaded
    assert not loaded & {"tensorflow", "keras", "mlflow", "zenml", "sklearn"}, loaded
    assert "matplotlib.pyplot" not in modules
