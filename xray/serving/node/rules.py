"""What the node keeps and what it analyses, decided from an instance's header as it arrives.

Kept: the CR and DX storage classes (:data:`xray.config.node.STORAGE_CLASSES`) in a transfer syntax of
:data:`TRANSFER_SYNTAXES` (what the decode path reads). Any other storage class is acknowledged and dropped (a router
sends whole studies), counted. Of those kept, the node analyses what passes its rules (``node.rules``: modality, body
part, view, storage class); the version's header scope (``scope:``) applies on top when the image is predicted. A file
that cannot be read whole (truncated, its pixel data shorter than its header declares) is refused with a failure
status. Nothing read here is logged: :class:`Arrival` keeps the UIDs and the rule tags only."""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass

from xray.config.node import STORAGE_CLASSES, NodeRules

logger = logging.getLogger(__name__)

TRANSFER_SYNTAXES = (
    "ImplicitVRLittleEndian",
    "ExplicitVRLittleEndian",
    "DeflatedExplicitVRLittleEndian",
    "RLELossless",
    "JPEGBaseline8Bit",
    "JPEGExtended12Bit",
    "JPEGLossless",
    "JPEGLosslessSV1",
    "JPEGLSLossless",
    "JPEGLSNearLossless",
    "JPEG2000Lossless",
    "JPEG2000",
)
"""pydicom's keywords of the transfer syntaxes the node accepts: those the decode path reads (xray/data/dicom.py,
with the pylibjpeg and GDCM plugins)."""
NATIVE = ("ImplicitVRLittleEndian", "ExplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian")


class Unreadable(ValueError):
    """An instance that cannot be read whole; the message names no header value."""


@dataclass(frozen=True)
class Arrival:
    """What the node reads of an instance as it arrives: the UIDs and the tags its rules check."""

    sop_class: str
    """pydicom's keyword of the storage class (e.g. ``DigitalXRayImageStorageForPresentation``); empty when unknown."""
    study_instance_uid: str
    sop_instance_uid: str
    modality: str = ""
    body_part: str = ""
    view: str = ""


def uid_keywords(names) -> list[str]:
    """pydicom UIDs of keywords (``ComputedRadiographyImageStorage`` -> 1.2.840.10008.5.1.4.1.1.1)."""
    from pydicom import uid  # lazy: pydicom only where DICOM arrives

    return [getattr(uid, name) for name in names]


def kept(sop_class_uid: str) -> bool:
    return sop_class_uid in uid_keywords(STORAGE_CLASSES)


def inspect(data: bytes) -> Arrival:
    """Read a received instance (a Part 10 file, as pynetdicom hands it over) whole: its :class:`Arrival`, or
    :class:`Unreadable` when it is truncated or malformed (a native image's pixel data shorter than declared)."""
    import pydicom  # lazy: pydicom only where DICOM arrives

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote values
            dataset = pydicom.dcmread(io.BytesIO(data))
            syntax = dataset.file_meta.TransferSyntaxUID
            pixels = dataset.get("PixelData")
            if pixels is None:
                raise Unreadable("no pixel data")
            if syntax.keyword in NATIVE:
                frames = int(dataset.get("NumberOfFrames", 1) or 1)
                declared = (
                    int(dataset.Rows)
                    * int(dataset.Columns)
                    * int(dataset.get("SamplesPerPixel", 1))
                    * math.ceil(int(dataset.BitsAllocated) / 8)
                    * frames
                )
                if len(pixels) < declared:
                    raise Unreadable(f"truncated: pixel data {len(pixels)} bytes, the header declares {declared}")
            elif syntax.is_compressed:
                from pydicom.encaps import generate_fragments  # lazy: as above

                if sum(len(fragment) for fragment in generate_fragments(pixels)) == 0:
                    raise Unreadable("encapsulated pixel data without a fragment")
            return Arrival(
                sop_class=getattr(dataset.SOPClassUID, "keyword", "") or "",
                study_instance_uid=str(dataset.StudyInstanceUID),
                sop_instance_uid=str(dataset.SOPInstanceUID),
                modality=str(dataset.get("Modality", "") or "").strip().upper(),
                body_part=str(dataset.get("BodyPartExamined", "") or "").strip().upper(),
                view=str(dataset.get("ViewPosition", "") or "").strip().upper(),
            )
    except Unreadable:
        raise
    except Exception as error:  # noqa: BLE001 - a malformed file is the sender's: its kind, never its content
        raise Unreadable(f"cannot read: {type(error).__name__}") from None


def not_analysed(arrival: Arrival, rules: NodeRules) -> str:
    """Why the rules leave a kept instance unanalysed (names the rule, not the value); empty when it is analysed."""
    if arrival.sop_class not in rules.sop_classes:
        return "sop_class"
    for name, value, allowed in (
        ("modality", arrival.modality, rules.modalities),
        ("body_part", arrival.body_part, rules.body_parts),
        ("view", arrival.view, rules.views),
    ):
        if value and allowed and value not in allowed:
            return name
    if not arrival.modality and rules.modalities:
        return "modality"
    return ""
