"""The one image decoding path: bytes (any format, detected by content) to what the model and the checks see.

DICOM files (by their ``DICM`` preamble, whatever their name) go through :mod:`xray.data.dicom`, which applies the
standard's Modality and VOI LUTs and hands back 8-bit pixels; everything else through Pillow.

Training, evaluation, batch inference and serving all decode with :func:`decode_image` (the check and the decoded
picture) and :func:`decode_and_resize` (the model's input), so the pixels the model sees cannot drift between them.
The model itself takes raw RGB values in [0, 255]; backbone-specific scaling lives inside the model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

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


def _decode_dicom(data: bytes, level: str) -> tuple[ImageCheck, Image.Image | None]:
    try:
        header, pixels = dicom.read(data)
    except dicom.DicomError as error:
        return ImageCheck(False, str(error), format="DICOM", header=error.header), None
    image = Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")
    check = ImageCheck(
        True,
        width=image.width,
        height=image.height,
        channels=len(image.getbands()),
        format="DICOM",
        converted=_png(image, level),
        bits=header.bits_stored or 8,
        header=header,
    )
    return check, image


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


def decode_image(data: bytes, png_level: str = IN_FLIGHT) -> tuple[ImageCheck, Image.Image | None]:
    """Fully decode an image by content (the extension is not trusted): its check and, when readable, the decoded
    image as the model sees it (RGB when it had to be converted; ``converted`` is its copy in ``png_level``'s format:
    BMP in flight, PNG on disk)."""
    if not data:
        return ImageCheck(False, EMPTY), None
    if dicom.is_dicom(data):
        return _decode_dicom(data, png_level)
    try:
        # No context manager: closing a PIL image frees its pixels, and the decoded image is returned. The source is
        # an in-memory buffer, so no file handle stays open.
        image = Image.open(io.BytesIO(data))
        image.load()  # full decode: truncated data fails here, not in training
        fmt, mode = image.format or "unknown", image.mode
        check = ImageCheck(True, width=image.width, height=image.height, channels=len(image.getbands()), format=fmt)
        if mode in WIDE_MODES:
            # The model and the out-of-distribution checks both see these 8-bit levels (the PNG below is what the
            # model decodes), so a 16-bit export of an image scores as the 8-bit image does.
            image, check.bits = to_8bit(image)
        elif fmt not in NATIVE_FORMATS or mode not in NATIVE_MODES:
            image = image.convert("RGB")
        if image.mode != mode or fmt not in NATIVE_FORMATS:
            check.converted = _png(image, png_level)
        return check, image
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
