"""CR/DX DICOM files built from JPEG radiographs, for the tests and the DICOM benchmark.

``radiograph(jpeg, ...)`` stores the JPEG's grey levels so that the standard's display pipeline (Modality LUT, VOI
LUT, MONOCHROME1 inversion) gives them back: 8, 12 or 16 bits stored, with a rescale, a window, a VOI LUT or none,
in any transfer syntax of ``SYNTAXES``. ``SENTINELS`` fills every identifying tag with values a test can grep for.
"""

from __future__ import annotations

import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

# The transfer syntaxes the product reads, by a short name.
SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-baseline": JPEGBaseline8Bit,
    "jpeg-lossless": JPEGLosslessSV1,
    "jpeg-ls": JPEGLSLossless,
    "jpeg-ls-near": JPEGLSNearLossless,
    "jpeg2000-lossless": JPEG2000Lossless,
    "jpeg2000": JPEG2000,
}

SENTINELS = {
    "PatientName": "ZZSENTINELNAME^ZZSENTINELGIVEN",
    "PatientID": "ZZSENTINELPID77",
    "PatientBirthDate": "17760704",
    "OtherPatientIDs": "ZZSENTINELOTHERID",
    "PatientAddress": "ZZSENTINELADDRESS",
    "AccessionNumber": "ZZSENTACC99",
    "StudyID": "ZZSENTSTUDY",
    "InstitutionName": "ZZSENTINELHOSPITAL",
    "InstitutionAddress": "ZZSENTINELSTREET",
    "ReferringPhysicianName": "ZZSENTINELREFERRER^ZZSENTINELDOCTOR",
    "PerformingPhysicianName": "ZZSENTINELPERFORMER",
    "OperatorsName": "ZZSENTINELOPERATOR",
    "StationName": "ZZSENTSTATION",
    "DeviceSerialNumber": "ZZSENTSERIAL",
    "StudyDescription": "ZZSENTINELSTUDYDESC",
    "SeriesDescription": "ZZSENTINELSERIESDESC",
    "PatientComments": "ZZSENTINELCOMMENT",
}
"""One planted value per identifying tag; the birth date is a real date (an impossible age)."""


def grey_levels(image: bytes | np.ndarray) -> np.ndarray:
    """The 8-bit grey levels of an image file's bytes (the mean of its channels) or of an array."""
    if isinstance(image, np.ndarray):
        array = image
    else:
        with Image.open(io.BytesIO(image)) as picture:
            array = np.asarray(picture.convert("RGB"), dtype=np.float64).mean(axis=2)
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def radiograph(
    image: bytes | np.ndarray,
    *,
    bits: int = 12,
    syntax: str = "explicit",
    voi: str = "window",
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    modality: str = "DX",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    age: str | None = "003Y",
    sentinels: bool = False,
    preamble: bool = True,
    **tags,
) -> bytes:
    """A one-frame CR/DX file whose display is ``image``'s grey levels. ``voi``: window, window-exact, sigmoid, lut or
    none. ``rescale``: (slope, intercept) of the Modality LUT. ``tags``: any further or overriding attributes (a
    value of None deletes the attribute)."""
    levels = grey_levels(image).astype(np.int64)
    peak, step = 2**bits - 1, 2 ** (bits - 8)
    # The VOI output v that displays as g (MONOCHROME1 displays 255 - v), its modality value at the centre of v's
    # band of modality values, and the stored value the Modality LUT turns into it.
    output = levels if photometric == "MONOCHROME2" else 255 - levels
    modality_values = output * step + step // 2
    slope, intercept = rescale or (1.0, 0.0)
    stored = np.round((modality_values - intercept) / slope).astype(np.int64)
    if stored.min() < 0 or stored.max() > peak:
        raise ValueError("the rescale puts stored values outside BitsStored's range")

    ds = Dataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PresentationIntentType = "FOR PRESENTATION"
    if body_part:
        ds.BodyPartExamined = body_part
    if view:
        ds.ViewPosition = view
    if age:
        ds.PatientAge = age
    ds.PatientSex = "F"
    ds.Manufacturer = "xray-pipeline tests"
    ds.StudyDate = "20261101"
    ds.Rows, ds.Columns = levels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    # The window and the LUT that map v's band of modality values v*step .. v*step+step-1 back to v; the second
    # window is one the display must not use (the first one counts).
    if voi in ("window", "window-exact", "sigmoid"):
        ds.WindowCenter, ds.WindowWidth = [f"{128 * step}", "1000"], [f"{256 * step}", "2000"]
        if voi != "window":
            ds.VOILUTFunction = {"window-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}[voi]
    elif voi == "lut":
        entries = 256 * step
        item = Dataset()
        item.LUTDescriptor = [entries % 65536, 0, 16]
        item.add_new("LUTData", "OW", ((np.arange(entries) // step) * 257).astype("<u2").tobytes())
        ds.VOILUTSequence = [item]
    elif voi != "none":
        raise ValueError(f"unknown voi {voi!r}")
    if sentinels:
        for keyword, value in SENTINELS.items():
            setattr(ds, keyword, value)
    for keyword, value in tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)

    dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
    pixels = stored.astype(dtype)
    transfer = SYNTAXES[syntax]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = pixels.tobytes()
    if syntax in ("explicit", "implicit", "deflated"):
        ds.file_meta.TransferSyntaxUID = transfer
    elif syntax == "jpeg-baseline":
        if bits != 8:
            raise ValueError("JPEG baseline holds 8 bits")
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds.file_meta.TransferSyntaxUID = transfer
        ds.LossyImageCompression = "01"
    elif syntax == "jpeg-lossless":
        return _gdcm_transcode(_write(ds, preamble), transfer)
    else:
        options = {"jls_error": 2} if syntax == "jpeg-ls-near" else {"j2k_cr": [5]} if syntax == "jpeg2000" else {}
        ds.compress(transfer, pixels, generate_instance_uid=False, **options)
    return _write(ds, preamble)


def with_sentinels(path: str) -> bytes:
    """A DICOM file (one of pydicom's test files) with every identifying tag set to its sentinel."""
    ds = pydicom.dcmread(path)
    for keyword, value in SENTINELS.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _write(ds: Dataset, preamble: bool = True) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=preamble, implicit_vr=None)
    return buffer.getvalue()


def _gdcm_transcode(data: bytes, transfer) -> bytes:
    """JPEG lossless (process 14, SV1) by GDCM, the one encoder of it here."""
    import gdcm

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "in.dcm"), Path(folder, "out.dcm")
        source.write_bytes(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        if not reader.Read():
            raise RuntimeError("GDCM cannot read the file it was given")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError("GDCM could not encode JPEG lossless")
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(str(target))
        if not writer.Write():
            raise RuntimeError("GDCM could not write the file")
        out = target.read_bytes()
    assert pydicom.dcmread(io.BytesIO(out)).file_meta.TransferSyntaxUID == transfer
    return out


def nested(image: bytes | np.ndarray, depth: int, *, defined: bool = False, syntax: str = "explicit") -> bytes:
    """A radiograph (``sentinels`` in its header) whose RequestAttributesSequence holds ``depth`` sequences, each in
    the one before (undefined lengths, or ``defined``), written byte by byte: pydicom itself cannot write such a file
    (it recurses). ``syntax``: explicit, implicit or deflated."""
    implicit = syntax == "implicit"

    def element(group: int, number: int, value: bytes, length: int | None = None) -> bytes:
        length = len(value) if length is None else length
        if implicit:
            return struct.pack("<HHI", group, number, length) + value
        return struct.pack("<HH2sHI", group, number, b"SQ", 0, length) + value

    undefined = 0xFFFFFFFF
    code = struct.pack("<HHI", 0x0008, 0x0100, 2) if implicit else struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2)
    inner = code + b"X "
    for level in range(depth):
        tag = (0x0040, 0x0275) if level == depth - 1 else (0x0040, 0xA043)
        if defined:
            inner = element(*tag, struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner)
        else:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, undefined) + inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
            inner = element(*tag, item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), undefined)
    base = radiograph(image, bits=8, syntax="implicit" if implicit else "explicit", sentinels=True)
    at = base.rindex(struct.pack("<HH", 0x7FE0, 0x0010))
    data = base[:at] + inner + base[at:]
    if syntax != "deflated":
        return data
    start = 144 + struct.unpack_from("<I", data, 140)[0]  # past the file meta group: its length is its first element
    meta = pydicom.dcmread(io.BytesIO(base), stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(buffer, meta)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + compressor.compress(data[start:]) + compressor.flush()
