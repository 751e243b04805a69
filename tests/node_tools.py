"""What the node's tests share: radiographs to send, a loopback Storage SCP as the results' destination (pynetdicom,
every storage class in every transfer syntax), and a pynetdicom SCU that sends files and returns their statuses."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pydicom

from conftest import MINI_ZIP, free_port
from dicom_factory import SENTINELS, radiograph


def some_jpegs(count: int) -> list[bytes]:
    with zipfile.ZipFile(MINI_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("chest_xray/test/") and n.endswith(".jpeg"))
        return [archive.read(name) for name in names[: count * 3 : 3]][:count]


def study(count: int, sentinels: bool = True, **tags) -> list[bytes]:
    """``count`` DX radiographs of one study, a sentinel in every identifying tag."""
    study_uid = pydicom.uid.generate_uid()
    return [
        radiograph(jpeg, bits=12, sentinels=sentinels, StudyInstanceUID=study_uid, **tags) for jpeg in some_jpegs(count)
    ]


def uids(data: bytes) -> tuple[str, str]:
    dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(dataset.StudyInstanceUID), str(dataset.SOPInstanceUID)


class Destination:
    """A loopback Storage SCP: ``received`` {SOP Instance UID: [dataset, ...]} (one per C-STORE); ``status`` what it
    answers."""

    def __init__(self, ae_title: str = "RESULTS"):
        self.ae_title, self.port = ae_title, free_port()
        self.received: dict[str, list] = defaultdict(list)
        self.arrived: dict[str, float] = {}
        """{SOP Instance UID: when it first arrived (time.time())}."""
        self.status = 0x0000
        self.accept: int | None = None
        """Accept this many C-STOREs, then answer 0xA700 (out of resources); None: ``status`` always."""
        self.lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"dicom://{self.ae_title}@127.0.0.1:{self.port}"

    def objects(self, modality: str | None = None) -> list:
        with self.lock:
            found = [items[0] for items in self.received.values()]
        return [d for d in found if modality is None or d.Modality == modality]

    @contextmanager
    def running(self):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        def store(event):
            if self.accept is not None:
                self.status = 0x0000 if self.accept > 0 else 0xA700
                self.accept -= 1
            if self.status == 0x0000:
                dataset = event.dataset
                dataset.file_meta = event.file_meta
                with self.lock:
                    self.received[str(dataset.SOPInstanceUID)].append(dataset)
                    self.arrived.setdefault(str(dataset.SOPInstanceUID), time.time())
            return self.status

        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
        try:
            yield self
        finally:
            server.shutdown()


def send(port: int, files: list, calling: str = "MODALITY", called: str = "XRAY_AI", priority: int = 0):
    """C-STORE each of ``files`` in one association (pynetdicom as the SCU): their status codes, or None when the
    association was rejected."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300  # a loaded shared machine, never a failure
    datasets = [pydicom.dcmread(io.BytesIO(data)) for data in files]
    for dataset in datasets:
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title=called)
    if not association.is_established:
        return None
    try:
        return [int(association.send_c_store(d, priority=priority).Status) for d in datasets]
    finally:
        association.release()


def no_sentinel_in(*texts: str) -> None:
    for text in texts:
        for keyword, value in SENTINELS.items():
            for piece in value.split("^"):
                assert piece not in text, f"{keyword} sentinel found"


def tree_text(root: Path, skip_received: bool = True) -> str:
    """Every path under ``root`` and the content of every file but the received instances themselves."""
    parts = []
    for path in root.rglob("*"):
        parts.append(str(path))
        if path.is_file() and not (skip_received and path.parent.parent.name == "studies"):
            parts.append(path.read_bytes().decode("latin-1"))
    return "\n".join(parts)
