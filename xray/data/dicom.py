"""DICOM radiographs: the facts of the header the checks need, and the pixels as the model's 8-bit input.

A file is DICOM by its ``DICM`` preamble (whatever its name). :func:`read` follows the standard's display pipeline
(PS3.3 C.11, PS3.4 N.2): stored values (BitsStored respected, any supported transfer syntax) -> Modality LUT
(RescaleSlope/Intercept or the Modality LUT Sequence) -> VOI LUT (the VOI LUT Sequence's first LUT, else the first
window of WindowCenter/WindowWidth with its VOILUTFunction, else the whole range the Modality LUT can produce) ->
0-255 -> inverted when MONOCHROME1. Colour images (RGB, YBR) come back as RGB. Multi-frame images, palette colour
and objects without pixel data are unreadable, with the reason.

**What is kept.** :class:`DicomHeader` holds the UIDs, the tags the scope checks read (Modality, BodyPartExamined,
ViewPosition, the age), the subgroup tags (PatientSex, Manufacturer) and a keyed hash of PatientID. No other value
of the header leaves this module: every message built after the header was read is passed through
:func:`redact`, and pydicom's own warnings (which quote values) are silenced while a file is read.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import math
import os
import re
import secrets
import threading
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import date

import numpy as np

from xray.config.limits import DecodeLimits, OverLimit

logger = logging.getLogger(__name__)

DEFAULT_LIMITS = DecodeLimits()
PREAMBLE = 128
MAGIC = b"DICM"
PATIENT_KEY_ENV = "XRAY_PATIENT_KEY"
GREY = {"MONOCHROME1", "MONOCHROME2"}
COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}

# Values that identify a patient, a visit or a person: never in a log, a row, a store or a message. The list is the
# person and institution tags of PS3.15's Basic Application Level Confidentiality Profile that a radiograph carries.
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "OtherPatientIDs",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MilitaryRank",
    "MedicalRecordLocator",
    "EthnicGroup",
    "Occupation",
    "PatientComments",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "OperatorsName",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
    "RequestAttributesSequence",
    "StudyDescription",
    "SeriesDescription",
    "AdmittingDiagnosesDescription",
    "AdditionalPatientHistory",
)


class DicomError(ValueError):
    """A DICOM file that cannot become a picture for the model; the message names no header value."""

    def __init__(self, reason: str, header: DicomHeader | None = None):
        super().__init__(reason)
        self.header = header


@dataclass(frozen=True)
class DicomHeader:
    """What is kept of a DICOM file's header (module docstring): nothing that identifies the patient."""

    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    sop_class: str = ""
    """The SOP class's name (e.g. "Digital X-Ray Image Storage - For Presentation")."""
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    patient_age: str = ""
    """PatientAge as written (an age string such as ``045Y``; ``090Y`` and above are written ``over 89Y``)."""
    age_years: float | None = None
    """From PatientAge, else from StudyDate - PatientBirthDate (``age_source`` says which); None when neither."""
    age_source: str = ""
    sex: str = ""
    manufacturer: str = ""
    patient: str = ""
    """A keyed hash of PatientID (:func:`patient_hash`); empty when the header has no PatientID."""
    transfer_syntax: str = ""
    photometric: str = ""
    bits_stored: int = 0

    @property
    def uids(self) -> dict[str, str]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
        }

    def to_dict(self) -> dict:
        return asdict(self)


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    return data[PREAMBLE : PREAMBLE + 4] == MAGIC


_process_key: bytes | None = None
_process_key_lock = threading.Lock()


def patient_key() -> bytes:
    """The site secret that keys patient hashes: ``XRAY_PATIENT_KEY``, else a random key for this process only (the
    grouping then holds within one run, and the hashes cannot be matched to PatientIDs by anyone). The fetch threads
    of a batch ask at once: one key is made, and said once."""
    global _process_key
    configured = os.environ.get(PATIENT_KEY_ENV)
    if configured:
        return configured.encode()
    with _process_key_lock:
        if _process_key is None:
            _process_key = secrets.token_bytes(32)
            logger.info(
                "%s is not set: patients are grouped by a key that lasts for this process only", PATIENT_KEY_ENV
            )
    return _process_key


def patient_hash(patient_id: str, key: bytes | None = None) -> str:
    """HMAC-SHA256 of a PatientID under the site secret, 16 bytes in hex: the same patient gives the same hash under
    the same key, and without the key the hash says nothing about the ID."""
    return hmac.new(key or patient_key(), patient_id.encode(), hashlib.sha256).hexdigest()[:32]


def redact(text: str, dataset) -> str:
    """``text`` with every identifying value of ``dataset`` (and the pieces of person names) replaced."""
    return _scrub(text, identifying_values(dataset))


def _scrub(text: str, values: list[str]) -> str:
    for value in values:
        text = text.replace(value, "<redacted>")
    return text


def identifying_values(dataset) -> list[str]:
    """Every identifying value of ``dataset`` and the pieces of its person names, longest first."""
    values: set[str] = set()
    for keyword in IDENTIFYING:
        element = dataset.get(keyword) if dataset is not None else None
        if element is None or element == "":
            continue
        for value in element if isinstance(element, (list, tuple)) or _is_multi(element) else [element]:
            value = str(value).strip()
            if value:
                values.add(value)
                values.update(part for part in re.split(r"[\^=\s]+", value) if len(part) >= 3)
    return sorted(values, key=len, reverse=True)


def _is_multi(value) -> bool:
    from pydicom.multival import MultiValue  # lazy: pydicom only where a DICOM file is read

    return isinstance(value, MultiValue)


def read(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, admit=nullcontext) -> tuple[DicomHeader, np.ndarray]:
    """The header's kept facts and the pixels as uint8 (rows x columns, or rows x columns x 3 for colour).

    Raises DicomError (with the header when it could be read) for anything that is not one readable image frame or
    is over ``limits``. ``admit(pixels)``: a context the pixels are decoded in
    (:class:`xray.config.limits.PixelBudget`).
    Callers check the file's structure first (:func:`xray.data.images.check_dicom_structure`: nesting, inflation).
    """
    import pydicom  # lazy: pydicom's import is only paid where DICOM arrives

    # pydicom logs (and warns) about invalid values by quoting them: its log would carry patient data. Its messages
    # stay below every handler (its import sets the level, so this follows the import); what went wrong reaches the
    # row's reason through DicomError, redacted.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    with warnings.catch_warnings():
        # pydicom's warnings about invalid values quote the values; the reason below names the problem instead.
        warnings.simplefilter("ignore")
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except Exception as error:  # noqa: BLE001 - pydicom's errors, a recursion, a value it cannot convert
            raise DicomError(f"cannot decode DICOM: malformed header ({type(error).__name__})") from None
        try:
            header = _header(dataset)
        except Exception as error:  # noqa: BLE001 - any malformed value of the kept tags
            raise DicomError(f"cannot decode DICOM: malformed header ({type(error).__name__})") from None
        try:
            return header, _pixels(dataset, header, limits, admit)
        except (DicomError, OverLimit) as error:
            raise DicomError(str(error), header) from None
        except MemoryError:
            raise DicomError("cannot decode DICOM pixel data: it does not fit in memory", header) from None
        except Exception as error:  # noqa: BLE001 - a decoder plugin's own error types; the batch goes on
            message = redact(f"{error}".splitlines()[0] if str(error) else type(error).__name__, dataset)
            raise DicomError(
                f"cannot decode DICOM pixel data: {header.transfer_syntax}: {message}"[:300], header
            ) from None


def _text(dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    return str(value[0] if _is_multi(value) and len(value) else value).strip()


_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
_CODE = re.compile(r"^[A-Z0-9 _]{1,16}$")


def _code(value: str, values: list[str]) -> str:
    """A code string (Modality, BodyPartExamined, ViewPosition, PatientSex) as the standard allows it (upper-case
    letters, digits, space, underscore; 16 at most), and never a copy of an identifying value."""
    value = value.upper()
    if not value:
        return ""
    if not _CODE.match(value):
        return "(not a code string)"
    return _scrub(value, values)


def _uid(value: str) -> str:
    """A UID only when it is one (digits and dots, at most 64): a malformed value is not copied anywhere."""
    return value if _UID.match(value) else ""


def _header(dataset) -> DicomHeader:
    from pydicom.uid import UID  # lazy: see read

    meta = getattr(dataset, "file_meta", None)
    syntax = _uid(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else ""
    sop_class = _uid(_text(dataset, "SOPClassUID")) or (
        _uid(str(meta.get("MediaStorageSOPClassUID", ""))) if meta else ""
    )
    age_text = _text(dataset, "PatientAge")
    age, source = age_of(age_text), "PatientAge"
    if age is None:
        age, source = (
            _age_from_dates(_text(dataset, "StudyDate"), _text(dataset, "PatientBirthDate")),
            ("StudyDate - PatientBirthDate"),
        )
    patient = _text(dataset, "PatientID")
    identifying = identifying_values(dataset)
    return DicomHeader(
        study_instance_uid=_uid(_text(dataset, "StudyInstanceUID")),
        series_instance_uid=_uid(_text(dataset, "SeriesInstanceUID")),
        sop_instance_uid=_uid(_text(dataset, "SOPInstanceUID")),
        sop_class=UID(sop_class).name if sop_class else "",
        modality=_code(_text(dataset, "Modality"), identifying),
        body_part=_code(_text(dataset, "BodyPartExamined"), identifying),
        view_position=_code(_text(dataset, "ViewPosition"), identifying),
        patient_age=("over 89Y" if age is not None and age >= 90 and source == "PatientAge" else age_text)
        if _AGE.match(age_text.upper())
        else "",
        age_years=age,
        age_source=source if age is not None else "",
        sex=_code(_text(dataset, "PatientSex"), identifying),
        manufacturer=_scrub(_text(dataset, "Manufacturer")[:64], identifying),
        patient=patient_hash(patient) if patient else "",
        transfer_syntax=UID(syntax).name if syntax else "",
        photometric=_code(_text(dataset, "PhotometricInterpretation"), identifying),
        bits_stored=int(dataset.get("BitsStored") or 0),
    )


_AGE = re.compile(r"^(\d{3})([DWMY])$")
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def age_of(text: str) -> float | None:
    """Years from a DICOM age string (``045Y``, ``018M``, ``010W``, ``020D``); None when absent or malformed."""
    match = _AGE.match(text.strip().upper()) if text else None
    return int(match.group(1)) * _UNIT_YEARS[match.group(2)] if match else None


def _age_from_dates(study: str, birth: str) -> float | None:
    try:
        then = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
        now = date(int(study[:4]), int(study[4:6]), int(study[6:8]))
    except (ValueError, IndexError):
        return None
    days = (now - then).days
    return days / 365.25 if days >= 0 else None


def _pixels(dataset, header: DicomHeader, limits: DecodeLimits, admit) -> np.ndarray:
    if "PixelData" not in dataset:
        if "Rows" in dataset or "Image Storage" in header.sop_class:
            raise DicomError("cannot decode DICOM: an image without pixel data (truncated?)")
        kind = f" ({header.sop_class})" if header.sop_class else ""
        raise DicomError(f"DICOM without pixel data: not an image{kind}")
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM: {frames} frames, one radiograph per file is expected")
    photometric = header.photometric
    if photometric not in GREY | COLOUR:
        kind = "colour palette" if photometric == "PALETTE COLOR" else "photometric interpretation"
        raise DicomError(
            f"unsupported DICOM {kind}: {photometric or 'none'}; a radiograph is MONOCHROME1 or MONOCHROME2"
        )
    rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
    samples = int(dataset.get("SamplesPerPixel") or 1)
    if rows <= 0 or columns <= 0:
        raise DicomError(f"DICOM without pixels: declares {rows} x {columns}")
    if rows * columns * samples > limits.max_image_pixels:
        raise DicomError(
            f"DICOM too large: declares {rows} x {columns} x {samples} pixels, over max_image_pixels "
            f"{limits.max_image_pixels}"
        )
    with admit(rows * columns * samples):
        return _display_pipeline(dataset, photometric)


def _display_pipeline(dataset, photometric: str) -> np.ndarray:
    stored = dataset.pixel_array
    if photometric in COLOUR:
        # pydicom converts YBR to RGB; the model takes RGB values in 0-255.
        return _to_8bit(stored.astype(np.float64), 0.0, float(2 ** int(dataset.BitsStored) - 1))
    if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2:
        # The whole pipeline computed once per stored value present, then looked up: the same numbers, and a
        # 3000 x 3000 radiograph costs a table of at most 65536 entries instead of 9 M float operations per step.
        low, high = int(stored.min()), int(stored.max())
        table = display(np.arange(low, high + 1).astype(stored.dtype), dataset)
        return table[stored - stored.dtype.type(low)] if low >= 0 else table[stored.astype(np.int32) - low]
    return display(stored, dataset)


def display(stored: np.ndarray, dataset) -> np.ndarray:
    """Stored grey values -> Modality LUT -> VOI LUT -> 0-255 (uint8), inverted for MONOCHROME1."""
    from pydicom.pixels import apply_modality_lut, apply_voi  # lazy: see read

    values = apply_modality_lut(stored, dataset).astype(np.float64)
    if "VOILUTSequence" in dataset and len(dataset.VOILUTSequence):
        lut = dataset.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2])
        picture = _to_8bit(apply_voi(values, dataset, index=0).astype(np.float64), 0.0, float(2**bits - 1))
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        centre, width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)
        function = _text(dataset, "VOILUTFunction").upper() or "LINEAR"
        picture = window(values, centre, width, function)
    else:
        low, high = _modality_range(stored, dataset)
        picture = _to_8bit(values, low, high)
    if _text(dataset, "PhotometricInterpretation").upper() == "MONOCHROME1":
        picture = 255 - picture
    return picture


def _first(value) -> float:
    return float(value[0] if _is_multi(value) or isinstance(value, (list, tuple)) else value)


def window(values: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID) onto 0-255."""
    if function == "SIGMOID":
        if width <= 0:
            raise DicomError(f"invalid DICOM window: WindowWidth {width:g} must be above 0 for SIGMOID")
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise DicomError(f"invalid DICOM window: WindowWidth {width:g} must be above 0 for LINEAR_EXACT")
        out = ((values - centre) / width + 0.5) * 255.0
    elif function == "LINEAR":
        if width < 1:
            raise DicomError(f"invalid DICOM window: WindowWidth {width:g} must be at least 1 for LINEAR")
        out = ((values - (centre - 0.5)) / (width - 1) + 0.5) * 255.0 if width > 1 else (values > centre - 0.5) * 255.0
    else:
        raise DicomError(f"invalid DICOM window: unknown VOILUTFunction {function!r}")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _modality_range(stored: np.ndarray, dataset) -> tuple[float, float]:
    """The range of values the Modality LUT can produce from BitsStored's range: the display range when the file
    gives no VOI (an 8-bit image made from a JPEG then displays as that JPEG)."""
    from pydicom.pixels import apply_modality_lut  # lazy: see read

    bits = int(dataset.get("BitsStored") or 8)
    signed = int(dataset.get("PixelRepresentation") or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if "ModalityLUTSequence" in dataset and len(dataset.ModalityLUTSequence):
        return 0.0, float(2 ** int(dataset.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    ends = apply_modality_lut(np.array([low, high], dtype=stored.dtype if not signed else np.int64), dataset)
    return float(np.min(ends)), float(np.max(ends))


def _to_8bit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low
    if not math.isfinite(span) or span <= 0:
        raise DicomError(f"invalid DICOM display range: {low:g} to {high:g} is empty")
    return np.clip(np.round((values - low) * (255.0 / span)), 0, 255).astype(np.uint8)
