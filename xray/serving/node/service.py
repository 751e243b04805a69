"""The node: what it received analysed once each study is stable, urgent studies first, every result sent on.

One analysis thread takes the stable studies of the spool (:mod:`.spool`), urgent first, in batches of whole studies
(:func:`batches`): the instances the current model version has not reported are predicted together (the one
prediction path, :meth:`xray.serving.predictor.ChestXrayPredictor.predict_bytes`), their results built
(:mod:`.results`; with ``build_workers``, in that many processes while the thread predicts the next batch) and written
to the outbox, their rows written to the prediction log, and only then marked done for the version and released to
the outbox's own thread, which delivers them (a slow destination never holds the analysis up); the received files
are pruned once their results left. Between batches the node asks ``load`` for a new champion (every ``reload_s``),
and a stop (SIGTERM) finishes the batches in hand first. A restart (after ``kill -9`` too) delivers the released
outbox and analyses whatever the spool holds that the version has not marked done: an instance is reported once per
model version."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from xray import CLASS_NAMES
from xray.config.node import NodeConfig
from xray.data.images import decode_image
from xray.model import gradcam
from xray.monitoring.ood import OK, UNREADABLE
from xray.serving.node import results, scp, triage
from xray.serving.node.spool import GB, Spool, Study

logger = logging.getLogger(__name__)

BATCH = 16
"""Instances per model call: the stable studies are analysed together, up to this many instances."""


def batches(studies: list[Study]) -> list[list[Study]]:
    """Whole studies, in their order, grouped up to :data:`BATCH` instances (a bigger study is a batch of its own)."""
    groups: list[list[Study]] = []
    size = 0
    for study in studies:
        if groups and size + len(study.files) <= BATCH:
            groups[-1].append(study)
            size += len(study.files)
        else:
            groups.append([study])
            size = len(study.files)
    return groups


@dataclass
class Predicted:
    """A batch predicted by ``version``: its spooled ``paths``, the prediction ``table`` (the prediction log's rows),
    the build ``jobs`` (:func:`xray.serving.node.results.build_one`'s arguments) and what they ``built``: {kind: Part 10
    bytes} each, or the build processes' futures of them."""

    version: str
    paths: list[Path]
    table: pd.DataFrame
    jobs: list[tuple]
    built: list


class Node:
    """The DICOM node around ``predictor`` (the version it starts with): ``load(version)`` returns a newer
    champion's predictor, or None when the champion is still ``version``; ``log``: the prediction log (a
    :class:`xray.monitoring.prediction_log.PredictionLog`) or None."""

    def __init__(self, config: NodeConfig, predictor, model: str, load: Callable | None = None, log=None):
        self.config, self.predictor, self.model, self.load, self.log = config, predictor, model, load, log
        self.spool = Spool(config.spool, int(config.max_spool_gb * GB))
        destinations = [results.Destination(uri) for uri in config.destinations]
        self.sender = results.Sender(destinations, config.attempts, config.backoff_s, config.ae_title)
        self.receiver = scp.Receiver(self.spool, config, lambda: str(self.predictor.version), self._wake)
        self.counts = Counter()
        self.seconds = Counter()
        """Wall seconds of the analysis thread: predict (read back, decode, model), build (results), record (outbox,
        prediction log, done marks), deliver."""
        self.stopping, self.wakeup = threading.Event(), threading.Event()
        self.checked = time.monotonic()
        self.pool = self._builders()
        self.warming: list[Future] = []
        """One trivial job per build process, submitted at :meth:`start` so that each starts (and warms) at once."""
        self.in_hand: list[Predicted] = []
        """Batches predicted and not yet recorded (:meth:`record`): between batches at most one, whose results the build
        processes are building while the next batch is predicted."""
        self.server = None
        self.thread: threading.Thread | None = None
        self.courier: threading.Thread | None = None
        self.outgoing = threading.Event()

    def _wake(self) -> None:
        self.wakeup.set()

    def _builders(self) -> ProcessPoolExecutor | None:
        """The build processes (``build_workers``; none: the analysis thread builds): spawned, each made ready by
        :func:`xray.serving.node.results.builder` and ended with this process."""
        if not self.config.build_workers:
            return None
        return ProcessPoolExecutor(
            self.config.build_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=results.builder,
            initargs=(os.getpid(),),
        )

    def _renew_builders(self) -> None:
        """New build processes when one ended under the pool (killed, out of memory), which breaks the whole pool."""
        try:
            self.pool.submit(abs, 0)
        except BrokenProcessPool:
            logger.error("a build process ended unexpectedly; starting %d new ones", self.config.build_workers)
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._builders()
            self.warming = [self.pool.submit(abs, 0) for _ in range(self.config.build_workers)]

    # -- the process --

    def start(self) -> Node:
        revived = self.spool.revive()
        if revived:
            logger.info("%d dead letter(s) back in the outbox", revived)
        if self.pool is not None:
            self.warming = [self.pool.submit(abs, 0) for _ in range(self.config.build_workers)]
        try:
            self.server = scp.serve(self.config, self.receiver)
        except BaseException:
            if self.pool is not None:  # the build processes started above end with the failed start
                self.pool.shutdown(wait=False, cancel_futures=True)
            raise
        self.thread = threading.Thread(target=self._run, name="xray-node", daemon=True)
        self.courier = threading.Thread(target=self._deliver_on, name="xray-node-results", daemon=True)
        self.thread.start()
        self.courier.start()
        return self

    def stop(self, timeout_s: float = 600.0) -> None:
        """Stop taking associations, finish the batches in hand, send their results (one try each: what fails stays
        in the outbox for the next start), flush the prediction log, end the build processes. An analysis still busy
        after ``timeout_s`` (a build that hangs) is left to the process's end: the stop does not wait for it, and
        what it held is analysed again at the next start."""
        self.stopping.set()
        self.wakeup.set()
        self.outgoing.set()
        if self.server is not None:
            self.server.shutdown()
        for thread in (self.thread, self.courier):
            if thread is not None:
                thread.join(timeout_s)
        finished = self.thread is None or not self.thread.is_alive()
        if not finished:
            logger.error("the analysis did not finish in %g s; stopping without it", timeout_s)
        self.deliver()
        self.prune()
        if self.log is not None:
            self.log.close()
        if self.pool is not None:  # the processes of an unfinished build end with this process (results.builder)
            self.pool.shutdown(wait=finished, cancel_futures=not finished)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the node goes on; the failure is logged with its traceback
                logger.exception("the node's analysis failed; retrying in %g s", self.config.stable_seconds)
                self.stopping.wait(self.config.stable_seconds)
            self.wakeup.wait(min(1.0, self.config.stable_seconds / 4))
            self.wakeup.clear()

    def _deliver_on(self) -> None:
        """The results' own thread: a slow or absent destination never holds the analysis up."""
        while not self.stopping.is_set():
            try:
                self.deliver()
            except Exception:  # noqa: BLE001 - the node goes on; the failure is logged with its traceback
                logger.exception("the node's delivery failed; retrying")
            self.outgoing.wait(1.0)
            self.outgoing.clear()

    def step(self, now: float | None = None) -> int:
        """Analyse the studies stable at ``now``, a batch of whole studies at a time (up to :data:`BATCH` instances, a
        bigger study alone), their results handed to the delivery thread (delivered here when the node was not
        started); then prune what is delivered. How many studies."""
        done = 0
        try:
            for group in batches(self.spool.stable(self.config.stable_seconds, now)):
                if self.stopping.is_set():
                    break  # the batches in hand are finished; the other studies wait in the spool for the next start
                if self._reload_due():
                    self.settle()  # the batch in hand first: its results wait for no registry or new model
                self.reload()
                self.analyse(group)
                self._hand_on()
                done += len(group)
        finally:
            self.settle()
        self._hand_on()
        self.prune()
        return done

    def settle(self) -> None:
        """Every batch in hand recorded, also when the step failed (what was built is kept); a failed record leaves
        its batch to the next step, nothing stays in hand. The first failure is raised once all were tried."""
        failure = None
        while self.in_hand:
            try:
                self.record()
            except Exception as error:  # noqa: BLE001 - raised below, once the other batches are recorded
                failure = failure or error
        if failure is not None:
            raise failure

    def _hand_on(self) -> None:
        """What was recorded, to the delivery thread (delivered here when the node was not started)."""
        if self.courier is None:
            self.deliver()
        self.outgoing.set()

    def prune(self) -> None:
        """The received files whose results left the outbox, removed (:meth:`Spool.prune`)."""
        version = str(self.predictor.version)
        for study in self.spool.studies():
            self.spool.prune(study, version)

    def _reload_due(self) -> bool:
        return self.load is not None and time.monotonic() - self.checked >= self.config.reload_s

    def reload(self) -> None:
        """A new champion, between studies, every ``reload_s`` (associations go on meanwhile)."""
        if not self._reload_due():
            return
        self.checked = time.monotonic()
        try:
            newer = self.load(str(self.predictor.version))
        except Exception as error:  # noqa: BLE001 - the registry unreachable: the node keeps the version it has
            logger.error(
                "champion not checked (%s: %s); keeping version %s", type(error).__name__, error, self.predictor.version
            )
            return
        if newer is not None:
            logger.info("new champion: version %s replaces %s", newer.version, self.predictor.version)
            self.predictor = newer
            self.counts["reloads"] += 1

    # -- one study --

    def analyse(self, studies: list[Study]) -> None:
        """The instances of ``studies`` the current version has not reported, predicted and their results built: in
        the analysis thread, then recorded (:meth:`record`); or, with ``build_workers``, in the build processes while
        the thread predicts the next batch: a batch is recorded once the next is predicted, or at the end of the step."""
        predictor, version = self.predictor, str(self.predictor.version)
        pending = [p for study in studies for p in study.files if p.exists() and not self._done(version, p.stem)]
        for start in range(0, len(pending), BATCH):
            paths = pending[start : start + BATCH]
            clock = time.perf_counter()
            images = [path.read_bytes() for path in paths]
            table = predictor.predict_bytes(images)
            self.seconds["predict"] += time.perf_counter() - clock
            table["sha256"] = [hashlib.sha256(data).hexdigest() for data in images]
            table["path"] = ""
            rows = table.to_dict("records")
            clock = time.perf_counter()
            explained = self._explain(predictor, rows, images) if self.config.heatmaps else {}
            threshold = triage.threshold_of(self.config.urgent_threshold, predictor.threshold)
            jobs = [
                (
                    path,
                    row,
                    self.model,
                    version,
                    explained.get(row["sop_instance_uid"]),
                    triage.is_urgent(row, threshold),
                )
                for path, row in zip(paths, rows)
                if row["status"] != UNREADABLE  # no report: nothing was analysed (the reason is in the log)
            ]
            if self.pool is not None:
                try:
                    built = [self.pool.submit(results.build_one, *job) for job in jobs]
                except BrokenProcessPool:
                    self._renew_builders()
                    raise
            else:
                built = [results.build_one(*job) for job in jobs]
            self.seconds["build"] += time.perf_counter() - clock
            self.in_hand.append(Predicted(version, paths, table, jobs, built))
            while len(self.in_hand) > (1 if self.pool is not None else 0):
                self.record()

    def record(self) -> None:
        """The oldest batch in hand: its results (waited for) posted to the outbox for every destination, its rows
        counted and logged, its instances marked done for its version and released to the delivery thread, urgent
        ones alerted. A build that failed fails the batch, which stays unmarked: the next step analyses it again (with
        new build processes when one of them ended under it)."""
        batch = self.in_hand.pop(0)
        clock = time.perf_counter()
        try:
            made = [item.result() if isinstance(item, Future) else item for item in batch.built]
        except BrokenProcessPool:
            self._renew_builders()
            raise
        self.seconds["build"] += time.perf_counter() - clock
        clock = time.perf_counter()
        for job, objects in zip(batch.jobs, made):
            self.spool.hold(job[0].stem)
            for destination in self.sender.destinations:
                for kind, data in objects.items():
                    self.spool.post(job[0].stem, f"{destination.key}-{kind}.dcm", data)
        self.counts.update(f"analysed_{status}" for status in batch.table["status"])
        if self.log is not None:
            self.log.append(batch.table)
            self.log.flush()
        for path in batch.paths:
            self.spool.mark_done(batch.version, path.stem)
            self.spool.release(path.stem)
        self.counts["instances_reported"] += len(batch.paths)
        self.seconds["record"] += time.perf_counter() - clock
        for _, row, *_, urgent in batch.jobs:
            if urgent:
                self.counts["urgent"] += 1
                triage.alert(row["study_instance_uid"], row["probability"])

    def _done(self, version: str, instance_key: str) -> bool:
        return (self.spool.root / "done" / version / instance_key).exists()

    def _explain(self, predictor, rows: list[dict], images: list[bytes]) -> dict:
        """{SOP Instance UID: (Grad-CAM, grey picture)} of the ``ok`` rows, decoded by the one decode path."""
        chosen, encoded, pictures = [], [], []
        for row, data in zip(rows, images):
            if row["status"] != OK:
                continue
            check, image = decode_image(data)
            if not check.ok:
                continue
            picture = image.convert("L")
            picture.thumbnail((results.sr.CAPTURE_SIDE, results.sr.CAPTURE_SIDE))
            chosen.append(row)
            encoded.append(check.converted or data)
            pictures.append(np.asarray(picture))
        if not chosen:
            return {}
        pixels = gradcam.pixels_of(encoded, predictor.image_size)
        towards = [row["label"] == CLASS_NAMES[1] for row in chosen]
        maps = gradcam.heatmaps(predictor.model, pixels, predictor.threshold, towards)
        return {row["sop_instance_uid"]: (heatmap, picture) for row, heatmap, picture in zip(chosen, maps, pictures)}

    def deliver(self) -> None:
        waiting = self.spool.waiting()
        if waiting:
            clock = time.perf_counter()
            self.sender.deliver(self.spool, waiting, stop=self.stopping.is_set)
            self.seconds["deliver"] += time.perf_counter() - clock

    def summary(self) -> dict:
        return {
            "model_version": str(self.predictor.version),
            "runtime": self.predictor.runtime,
            **dict(self.receiver.counts),
            **dict(self.counts),
            "results_delivered": self.sender.delivered,
            "dead_letters": self.sender.dead_letters,
        }
