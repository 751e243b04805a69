"""The one image decoding path: bytes (any format, detected by content) to what the model and the checks see.

DICOM files (by their ``DICM`` preamble, whatever their name) go through :mod:`xray.data.dicom`, which applies the
standard's Modality and VOI LUTs and hands back 8-bit pixels; everything else through Pillow.

What a decode may cost is bounded before it is paid (:class:`xray.config.limits.DecodeLimits`): the pixels an image
declares (``max_image_pixels``), a DICOM file's nesting and inflation (:func:`check_dicom_structure`, before pydicom
reads it), and the pixels decoded at once (``admit``, a :class:`xray.config.limits.PixelBudget`). An image longer
than ``REDUCED_SIDE`` on a side reaches the model as a reduced copy (JPEG decoded at a reduced scale).

Training, evaluation, batch inference and serving all decode with :func:`decode_image` (the check and the decoded
picture) and :func:`decode_and_resize` (the model's input), so the pixels the model sees cannot drift between them.
The model itself takes raw RGB values in [0, 255]; backbone-specific scaling lives inside the model.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from xray.config.limits import DecodeLimits, OverLimit
from xray.data import dicom

PREPROCESSING = (
    "decode_image(channels=3) -> resize to image_size (area when shrinking, bilinear when enlarging) "
    "-> round to uint8 -> float32 in [0, 255]"
)


# Formats and modes tf.io.decode_image turns into 3-channel RGB as they are.
NATIVE_FORMATS = {"JPEG", "PNG"}
NATIVE_MODES = {"L", "RGB", "RGBA", "LA"}
# Grey images of more than 8 bits (16-bit PNG and TIFF, the usual lossless exports of a PACS; 32-bit integer TIFF)
# and the largest value of their bit depth: their grey levels are scaled to 0-255, never clipped.
EMPTY, NOT_AN_IMAGE = "empty file (0 bytes)", "not a recognised image format"
DEFAULT_LIMITS = DecodeLimits()
REDUCED_SIDE = 2048
"""Longer than this on a side, an image reaches the model and the features as a copy reduced by the smallest whole
factor that brings it within (box averaging): the model sees image_size (at most 1024 px), and a batch's copies stay
small. The check keeps the original width and height."""
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": None}


@dataclass
class ImageCheck:
    ok: bool
    reason: str = ""
    width: int = 0
    height: int = 0
    channels: int = 0
    format: str = ""
    converted: bytes | None = None
    """BMP (in flight) or PNG (on disk) bytes when the original must be re-encoded to reach the model as RGB (or as 8-bit grey)."""
    bits: int = 8
    """Bits per grey level of the original (16 for a 16-bit PNG or TIFF, BitsStored for DICOM)."""
    header: dicom.DicomHeader | None = None
    """What is kept of a DICOM file's header (UIDs, scope and subgroup tags; no patient data); None otherwise."""


IN_FLIGHT, ON_DISK = "BMP", "PNG"
"""The copy of a converted image: uncompressed BMP for one that lives for one model call (0.09 ms to encode a
224 x 224 grey picture and 0.26 ms for the model's graph to decode, against 1.1 and 0.37 ms for an uncompressed PNG),
PNG for one written into an extracted dataset."""


def _png(image: Image.Image, kind: str = IN_FLIGHT) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **({"compress_level": 6} if kind == "PNG" else {}))
    return buffer.getvalue()


def _decode_dicom(data: bytes, level: str, limits: DecodeLimits, admit) -> tuple[ImageCheck, Image.Image | None]:
    try:
        check_dicom_structure(data, limits)
        header, pixels = dicom.read(data, limits, admit)
    except dicom.DicomError as error:
        return ImageCheck(False, str(error), format="DICOM", header=error.header), None
    image = Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")
    check = ImageCheck(
        True,
        width=image.width,
        height=image.height,
        channels=len(image.getbands()),
        format="DICOM",
        bits=header.bits_stored or 8,
        header=header,
    )
    image = _reduced(image)
    check.converted = _png(image, level)
    return check, image


def _reduced(image: Image.Image) -> Image.Image:
    factor = math.ceil(max(image.size) / REDUCED_SIDE)
    return image.reduce(factor) if factor > 1 else image


def to_8bit(image: Image.Image) -> tuple[Image.Image, int]:
    """A grey image of more than 8 bits as 8-bit grey, each level scaled from the image's bit depth (65535 -> 255),
    and that depth. A 32-bit integer image whose values fit 16 bits is read as 16-bit (PIL opens some 16-bit files
    as mode I)."""
    values = np.asarray(image, dtype=np.float64)
    peak = WIDE_MODES[image.mode]
    if peak is None:
        if values.min() < 0:
            raise ValueError(f"negative grey levels in a {image.mode} image")
        peak = 65535 if values.max() <= 65535 else 2**32 - 1
    bits = 16 if peak == 65535 else 32
    levels = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
    return Image.fromarray(levels, mode="L"), bits


def decode_image(
    data: bytes, png_level: str = IN_FLIGHT, limits: DecodeLimits = DEFAULT_LIMITS, admit=nullcontext
) -> tuple[ImageCheck, Image.Image | None]:
    """Fully decode an image by content (the extension is not trusted): its check and, when readable, the decoded
    image as the model sees it (RGB when it had to be converted, reduced past ``REDUCED_SIDE``; ``converted`` is its
    copy in ``png_level``'s format: BMP in flight, PNG on disk). Over ``limits`` is a check that says which; the
    pixels are decoded inside ``admit(pixels)``."""
    if not data:
        return ImageCheck(False, EMPTY), None
    if dicom.is_dicom(data):
        return _decode_dicom(data, png_level, limits, admit)
    try:
        # No context manager: closing a PIL image frees its pixels, and the decoded image is returned. The source is
        # an in-memory buffer, so no file handle stays open.
        image = Image.open(io.BytesIO(data))
        fmt, mode, (width, height), bands = image.format or "unknown", image.mode, image.size, len(image.getbands())
        if width * height * bands > limits.max_image_pixels:
            raise OverLimit(
                f"image too large: declares {width} x {height} x {bands} pixels, over max_image_pixels "
                f"{limits.max_image_pixels}"
            )
        check = ImageCheck(True, width=width, height=height, channels=bands, format=fmt)
        with admit(width * height * bands):
            if fmt == "JPEG" and max(width, height) > REDUCED_SIDE:  # the codec decodes at 1/2, 1/4 or 1/8
                factor = math.ceil(max(width, height) / REDUCED_SIDE)
                image.draft(None, (math.ceil(width / factor), math.ceil(height / factor)))
            image.load()  # full decode: truncated data fails here, not in training
            if mode in WIDE_MODES:
                # The model and the out-of-distribution checks both see these 8-bit levels (the PNG below is what
                # the model decodes), so a 16-bit export of an image scores as the 8-bit image does.
                image, check.bits = to_8bit(image)
            elif fmt not in NATIVE_FORMATS or mode not in NATIVE_MODES:
                image = image.convert("RGB")
            image = _reduced(image)
        if image.mode != mode or fmt not in NATIVE_FORMATS or image.size != (width, height):
            check.converted = _png(image, png_level)
        return check, image
    except OverLimit as error:
        return ImageCheck(False, str(error)), None
    except UnidentifiedImageError:
        return ImageCheck(False, NOT_AN_IMAGE), None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return ImageCheck(False, f"cannot decode: {error}".splitlines()[0][:200]), None


def check_image(data: bytes) -> ImageCheck:
    """Fully decode an image by content (the extension is not trusted); a PNG copy is compressed to be stored."""
    return decode_image(data, ON_DISK)[0]


def decode_and_resize(data: Any, image_size: int):
    """Encoded bytes (JPEG, PNG, BMP, GIF; detected by content) -> uint8 HxWx3."""
    import tensorflow as tf  # lazy: TensorFlow's import takes seconds

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    size = [image_size, image_size]
    # Area averaging is the anti-aliased way to shrink, and 3x faster here than bilinear with antialias.
    shrinking = tf.reduce_min(tf.shape(image)[:2]) >= image_size
    image = tf.cond(
        shrinking,
        lambda: tf.image.resize(image, size, method="area"),
        lambda: tf.image.resize(image, size, method="bilinear"),
    )
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


# ---------------------------------------------------------------------------------------------------------------
# A DICOM file's structure, measured before pydicom reads it

DEFLATED, BIG_ENDIAN = "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"
INFLATED_BYTES_PER_PIXEL = 3
"""A Deflated Explicit VR dataset may inflate to this many bytes per pixel of ``max_image_pixels`` (16-bit grey: 2)."""
_LONG_VR = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM, _UNDEFINED, _PIXEL_DATA = 0xFFFEE000, 0xFFFFFFFF, 0x7FE00010


def check_dicom_structure(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """What pydicom would pay, measured without recursion before it reads a byte: how deep the sequences nest
    (pydicom reads a sequence by recursion, and a few kilobytes of nesting exhaust its stack or its time) and how far a
    Deflated Explicit VR dataset inflates (in bounded steps). A :class:`xray.data.dicom.DicomError` says which."""
    syntax, start = _dicom_meta(data)
    if syntax == DEFLATED:  # measured in 16 MB steps first; only a dataset within the cap is inflated whole
        inflater, rest = zlib.decompressobj(-zlib.MAX_WBITS), data[start:]
        cap, total = INFLATED_BYTES_PER_PIXEL * limits.max_image_pixels, 0
        try:
            while rest and total <= cap:
                total, rest = total + len(inflater.decompress(rest, 16 * 2**20)), inflater.unconsumed_tail
            if total > cap:
                raise dicom.DicomError(f"cannot decode DICOM: the deflated dataset inflates past {cap} bytes")
            data, start = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[start:], cap + 1), 0
        except zlib.error:
            raise dicom.DicomError("cannot decode DICOM: the deflated dataset is corrupt") from None
    if _nesting(data, start, ">" if syntax == BIG_ENDIAN else "<") > limits.max_nesting:
        raise dicom.DicomError(f"DICOM nested too deeply: sequences within sequences past {limits.max_nesting} levels")


def _dicom_meta(data: bytes) -> tuple[str, int]:
    """The file meta group's transfer syntax (explicit VR little endian, PS3.10) and where the dataset starts."""
    pos, syntax = dicom.PREAMBLE + 4, ""
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        element, long = data[pos + 2 : pos + 4], data[pos + 4 : pos + 6] in _LONG_VR
        start = pos + (12 if long else 8)
        pos = start + int.from_bytes(data[pos + 8 : pos + 12] if long else data[pos + 6 : pos + 8], "little")
        if element == b"\x10\x00":  # (0002,0010) Transfer Syntax UID
            syntax = data[start:pos].rstrip(b"\0 ").decode("ascii", "replace")
    return syntax, pos


def _nesting(data: bytes, pos: int, order: str) -> int:
    """The deepest nesting of sequences, element by element as pydicom reads them, with a stack of where each open
    sequence and item ends (an undefined length at its delimiter; encapsulated pixel data skipped to its delimiter)
    and whether its content is implicit VR (the dataset's, as pydicom finds it from its first element; a sequence
    stored as UN is implicit, PS3.5 6.2.2)."""
    item, end_of_sequence = struct.pack(order + "HH", 0xFFFE, 0xE000), struct.pack(order + "HHI", 0xFFFE, 0xE0DD, 0)
    dataset_implicit = not (b"AA" <= data[pos + 4 : pos + 6] <= b"ZZ")
    ends: list[tuple[int, bool]] = []
    deepest = 0
    while pos + 8 <= len(data):
        while ends and ends[-1][0] != _UNDEFINED and pos >= ends[-1][0]:
            ends.pop()
        implicit = ends[-1][1] if ends else dataset_implicit
        group, element, length = struct.unpack_from(order + "HHI", data, pos)
        tag, vr = group << 16 | element, None if implicit else data[pos + 4 : pos + 6]
        if group == 0xFFFE:  # an item or a delimiter: a tag and a 4-byte length in every encoding
            pos += 8
            if tag == _ITEM:
                ends.append((pos + length if length != _UNDEFINED else _UNDEFINED, implicit))
            elif ends and ends[-1][0] == _UNDEFINED:
                ends.pop()
            continue
        if vr is not None:  # explicit VR: a 2-byte length, or 2 reserved bytes and a 4-byte one
            long = vr in _LONG_VR
            length = struct.unpack_from(order + ("I" if long else "H"), data, pos + (8 if long else 6))[0]
            pos += 4 if long else 0
        pos += 8
        if vr == b"SQ" or (vr in (None, b"UN") and data[pos : pos + 4] == item and tag != _PIXEL_DATA):
            ends.append((pos + length if length != _UNDEFINED else _UNDEFINED, implicit or vr == b"UN"))
            deepest = max(deepest, (len(ends) + 1) // 2)
        elif length == _UNDEFINED:
            found = data.find(end_of_sequence, pos)
            pos = found + 8 if found >= 0 else len(data)
        else:
            pos += length
    return deepest
