"""The one image decoding path: bytes (any format, detected by content) to what the model and the checks see.

Training, evaluation, batch inference and serving all decode with :func:`decode_image` (the check and the decoded
picture) and :func:`decode_and_resize` (the model's input), so the pixels the model sees cannot drift between them.
The model itself takes raw RGB values in [0, 255]; backbone-specific scaling lives inside the model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

PREPROCESSING = (
    "decode_image(channels=3) -> resize to image_size (area when shrinking, bilinear when enlarging) "
    "-> round to uint8 -> float32 in [0, 255]"
)


# Formats and modes tf.io.decode_image turns into 3-channel RGB as they are.
NATIVE_FORMATS = {"JPEG", "PNG"}
NATIVE_MODES = {"L", "RGB", "RGBA", "LA"}


@dataclass
class ImageCheck:
    ok: bool
    reason: str = ""
    width: int = 0
    height: int = 0
    channels: int = 0
    format: str = ""
    converted: bytes | None = None
    """PNG bytes when the original must be re-encoded to reach the model as RGB."""


def decode_image(data: bytes) -> tuple[ImageCheck, Image.Image | None]:
    """Fully decode an image by content (the extension is not trusted): its check and, when readable, the decoded
    image as the model sees it (RGB when it had to be converted)."""
    if not data:
        return ImageCheck(False, "empty file (0 bytes)"), None
    try:
        # No context manager: closing a PIL image frees its pixels, and the decoded image is returned. The source is
        # an in-memory buffer, so no file handle stays open.
        image = Image.open(io.BytesIO(data))
        image.load()  # full decode: truncated data fails here, not in training
        fmt, mode = image.format or "unknown", image.mode
        check = ImageCheck(True, width=image.width, height=image.height, channels=len(image.getbands()), format=fmt)
        if fmt not in NATIVE_FORMATS or mode not in NATIVE_MODES:
            image = image.convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            check.converted = buffer.getvalue()
        return check, image
    except UnidentifiedImageError:
        return ImageCheck(False, "not a recognised image format"), None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return ImageCheck(False, f"cannot decode: {error}".splitlines()[0][:200]), None


def check_image(data: bytes) -> ImageCheck:
    """Fully decode an image by content (the extension is not trusted)."""
    return decode_image(data)[0]


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
