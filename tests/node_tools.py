"""What the node's tests share: radiographs to send, a loopback Storage SCP as the results' destination (pynetdicom,
every storage class in every transfer syntax), and a pynetdicom SCU that sends files and returns their statuses."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pydicom

from fixtures.destination import Destination  # noqa: F401 - the node's tests take it from here
from fixtures.dicom_factory import SENTINELS, radiograph
from support import MINI_ZIP


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
