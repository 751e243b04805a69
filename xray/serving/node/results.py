"""The node's results and their way out: the objects of :mod:`xray.serving.sr` (the TID 1500 report, the heatmap
Segmentation and Secondary Capture) built from a spooled file, and sent to every destination, ``dicom://AE@HOST:PORT``
by C-STORE (pynetdicom, retried with backoff) or ``dicomweb://HOST:PORT/ROOT`` by STOW-RS (the client and credentials
of :mod:`xray.storage.dicomweb`). A result whose tries ran out goes to the spool's dead letters, retried at the next
start. A result's UIDs derive from its source instance and the model version (:func:`xray.serving.sr.identities`), so
a result sent again after a crash is the same instance at the destination, never a second report."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom import AE

from xray.config.limits import PacsLimits
from xray.errors import XrayError
from xray.serving import sr
from xray.serving.node import triage
from xray.storage import dicomweb

logger = logging.getLogger(__name__)

_DICOM = re.compile(r"^dicom://(?P<ae>[^@/\s]{1,16})@(?P<host>[^:/\s]+):(?P<port>\d{1,5})$")
KINDS = ("report", "segmentation", "capture")
CALLING_AE = "XRAY_AI"


@dataclass(frozen=True)
class Destination:
    """Where results go: ``uri`` as configured; ``key`` names it in the outbox (no host in a file name)."""

    uri: str

    @property
    def key(self) -> str:
        return hashlib.sha256(self.uri.encode()).hexdigest()[:12]

    @property
    def dimse(self) -> tuple[str, str, int] | None:
        """(AE title, host, port) of a dicom:// destination; None for DICOMweb."""
        match = _DICOM.match(self.uri)
        return (match["ae"], match["host"], int(match["port"])) if match else None


def source_header(path: Path) -> Dataset:
    """What :mod:`xray.serving.sr` reads of a source image (its patient and study modules, the reference and the
    pixel grid), from a spooled file, through :func:`xray.serving.sr.source_header`."""
    import pydicom  # lazy: pydicom only where DICOM arrives

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        wanted = Dataset()
        for keyword in (*sr.PATIENT_STUDY, *sr.SOURCE_IMAGE):
            if keyword in dataset:
                wanted[keyword] = dataset[keyword]
        return sr.source_header(wanted.to_json_dict())


def build(
    header: Dataset, row: dict, model: str, version: str, explained: tuple[np.ndarray, np.ndarray] | None, mark
) -> dict[str, bytes]:
    """{kind: Part 10 bytes} of one analysed row: its heatmaps (``explained``: the Grad-CAM and the grey picture of
    an ``ok`` row) and its report, which refers to them; ``mark(report)`` adds the triage (:mod:`.triage`)."""
    made = {}
    if explained is not None:
        heatmap, picture = explained
        made["segmentation"] = sr.heatmap_segmentation(header, row, heatmap, model, version)
        made["capture"] = sr.heatmap_capture(header, row, heatmap, picture, model, version)
    report = sr.report(header, row, model, version, tuple(made.values()))
    mark(report)
    return {"report": sr.part10(report)} | {kind: sr.part10(dataset) for kind, dataset in made.items()}


def builder(node_pid: int) -> None:
    """A build process as it starts (the node's pool initializer): the node ``node_pid`` owns its end, so it ignores
    the SIGINT and SIGTERM that Ctrl-C or a service manager sends the whole process group (the node finishes the
    batches in hand, then shuts its builders down), and ends when the node has ended, also by ``kill -9`` (a thread
    watches for the process being handed to another parent); then it is made ready by :func:`warm`."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == node_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="xray-node-builder-watch", daemon=True).start()
    warm()


def warm() -> None:
    """One throwaway report built (never sent or kept), so that highdicom's imports and first-use tables are paid
    before the first study, not by it."""
    uid = "2.25.1"
    header = sr.source_header(
        {
            f"{tag_for_keyword(keyword):08X}": {"vr": vr, "Value": [value]}
            for keyword, vr, value in (
                ("SOPClassUID", "UI", "1.2.840.10008.5.1.4.1.1.1.1"),
                ("SOPInstanceUID", "UI", uid),
                ("StudyInstanceUID", "UI", uid),
                ("SeriesInstanceUID", "UI", uid),
                ("Modality", "CS", "DX"),
                ("Rows", "US", 8),
                ("Columns", "US", 8),
            )
        }
    )
    row = {"status": "ok", "label": "NORMAL", "probability": 0.0, "threshold": 0.5}
    build(header, row, "warm-up", "0", None, lambda report: triage.mark(report, False))


def build_one(path: Path, row: dict, model: str, version: str, explained, urgent: bool) -> dict[str, bytes]:
    """:func:`build` from a spooled file, the report marked urgent or not (:mod:`.triage`): what the node's build
    processes run (its arguments and result are plain values)."""
    return build(source_header(path), row, model, version, explained, lambda report: triage.mark(report, urgent))


@dataclass
class Sender:
    """Delivers the outbox: each result to its destination, ``attempts`` tries with a backoff doubling from
    ``backoff_s``; then a dead letter. Counts what it did."""

    destinations: list[Destination]
    attempts: int = 5
    backoff_s: float = 1.0
    calling_ae: str = CALLING_AE
    limits: PacsLimits | None = None
    delivered: int = 0
    dead_letters: int = 0
    _clients: dict = field(default_factory=dict, repr=False)

    def by_key(self) -> dict[str, Destination]:
        return {destination.key: destination for destination in self.destinations}

    def deliver(self, spool, paths: list[Path], stop=lambda: False) -> None:
        """Send ``paths`` (outbox files ``<destination key>-<kind>.dcm``), removing each once its destination has
        it; a result whose destination is no longer configured is a dead letter at once."""
        known = self.by_key()
        for destination_key in sorted({path.name.split("-", 1)[0] for path in paths}):
            mine = [path for path in paths if path.name.startswith(f"{destination_key}-")]
            destination = known.get(destination_key)
            if destination is None:
                for path in mine:
                    spool.dead_letter(path)
                    self.dead_letters += 1
                continue
            for attempt in range(self.attempts):
                try:
                    self._send(destination, [path for path in mine if path.exists()])
                    break
                except (OSError, RuntimeError, ValueError, XrayError) as error:  # ValueError: a context refused
                    wait = self.backoff_s * 2**attempt
                    logger.warning(
                        "results to %s: try %d of %d failed (%s)%s",
                        dicomweb.parse(destination.uri).uri if not destination.dimse else destination.uri,
                        attempt + 1,
                        self.attempts,
                        str(error).splitlines()[0][:200],
                        f"; again in {wait:g} s" if attempt + 1 < self.attempts else "; kept as dead letters",
                    )
                    if attempt + 1 < self.attempts and not stop():
                        time.sleep(wait)
                    elif attempt + 1 < self.attempts:
                        return  # stopping: the outbox keeps them for the next start
            else:
                for path in mine:
                    if path.exists():
                        spool.dead_letter(path)
                        self.dead_letters += 1

    def _send(self, destination: Destination, paths: list[Path]) -> None:
        if not paths:
            return

        def sent(path: Path) -> None:  # one result at its destination: it leaves the outbox at once
            path.unlink()
            self.delivered += 1

        if destination.dimse is None:
            client = self._clients.get(destination.uri)
            if client is None:
                client = dicomweb.Client(dicomweb.parse(destination.uri), max_attempts=1, limits=self.limits)
                self._clients[destination.uri] = client
            for start in range(0, len(paths), sr.STOW_OBJECTS):
                chunk = paths[start : start + sr.STOW_OBJECTS]
                client.store([path.read_bytes() for path in chunk])
                for path in chunk:
                    sent(path)
        else:
            c_store(destination.dimse, paths, self.calling_ae, sent)


def c_store(peer: tuple[str, str, int], paths: list[Path], calling_ae: str, sent=lambda path: None) -> None:
    """One association to ``peer`` (AE title, host, port) that stores ``paths`` (Part 10 files, each sent in its own
    transfer syntax), calling ``sent(path)`` after each success; a refused association or a non-success status is a
    RuntimeError."""
    import pydicom  # lazy: pydicom only where DICOM goes out

    title, host, port = peer
    contexts = {}
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        contexts.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(str(meta.TransferSyntaxUID))
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60  # a miss is retried, then a dead letter
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    association = ae.associate(host, port, ae_title=title)
    if not association.is_established:
        raise RuntimeError(f"association with {title} refused or not established")
    without_nagle(association)
    try:
        for path in paths:
            status = association.send_c_store(path)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                raise RuntimeError(f"C-STORE status 0x{code & 0xFFFF:04X}" if code >= 0 else "C-STORE: no answer")
            sent(path)
    finally:
        association.release()


def without_nagle(association) -> None:
    """TCP_NODELAY on the association's socket. Each C-STORE writes its command and its dataset, then waits for the
    answer: with Nagle's algorithm the second write waits for the peer's delayed acknowledgement (about 40 ms on
    Linux), every file. Measured on loopback with pynetdicom 3.0: 8 reports in one association 419 ms, 114 ms with
    it (docs/BENCHMARKS.md "DICOM node")."""
    connection = getattr(association.dul.socket, "socket", None)
    if connection is not None:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
