"""What reading may cost: an archive (zip bombs), a decoded image, a request, a PACS's answers. Config sections
``data.limits`` (:mod:`xray.config.data`), ``inference.decode`` and ``inference.pacs`` (:mod:`xray.config.inference`);
serving reads the decode limits from ``XRAY_SERVING_<KEY>`` variables (docs/USER_GUIDE.md, "Limits")."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

from pydantic import Field, model_validator

from xray.config.base import Section

MiB, GiB = 1024**2, 1024**3


class ArchiveLimits(Section):
    """Zip-bomb guards, enforced while streaming each entry."""

    max_entries: int = Field(200_000, ge=1)
    max_total_bytes: int = Field(8 * GiB, ge=1)
    max_entry_bytes: int = Field(256 * MiB, ge=1)
    max_compression_ratio: float = Field(100.0, ge=1)


class DecodeLimits(Section):
    """What decoding may cost; a file over a limit is that file's ``unreadable`` row, with the limit named."""

    max_image_pixels: int = Field(
        25_000_000,
        ge=1,
        description="Rows x columns x samples an image may declare (5000 x 5000; a 43 x 43 cm "
        "detector at 100 um is 18.5 M). An image over 2048 px a side reaches the model as a reduced copy.",
    )
    max_nesting: int = Field(16, ge=1, le=64, description="DICOM sequences nested in one another (a radiograph: 3).")
    max_decoding_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Pixels decoded at once in one process (batch inference's fetch workers, "
        "a serving worker's concurrent requests): a decode waits for room.",
    )
    max_request_pixels: int = Field(
        200_000_000,
        ge=1,
        description="Serving: pixels of one request's images together; images past it are "
        "unreadable rows that say to send them in another request.",
    )

    @model_validator(mode="after")
    def _one_image_fits(self) -> DecodeLimits:
        if self.max_image_pixels > min(self.max_decoding_pixels, self.max_request_pixels):
            raise ValueError("max_image_pixels must not exceed max_decoding_pixels nor max_request_pixels")
        return self

    @classmethod
    def from_environment(cls, prefix: str = "XRAY_SERVING_") -> DecodeLimits:
        """The defaults, each overridden by ``<prefix><KEY>`` where set (``XRAY_SERVING_MAX_IMAGE_PIXELS``...)."""
        return cls(
            **{
                key: os.environ[f"{prefix}{key.upper()}"]
                for key in cls.model_fields
                if f"{prefix}{key.upper()}" in os.environ
            }
        )


class PacsLimits(Section):
    """What a PACS's answers may cost (DICOMweb, :mod:`xray.storage.dicomweb`); over a limit is one error line."""

    max_instance_bytes: int = Field(
        64 * MiB, ge=1, description="One WADO-RS instance (an instance over it is unreadable)."
    )
    max_response_bytes: int = Field(16 * MiB, ge=1, description="One QIDO-RS page of JSON.")
    deadline_s: float = Field(120, gt=0, description="One request, from connecting to its last byte, retries included.")
    max_pages: int = Field(100, ge=1, description="Pages of one QIDO-RS query (100 results a page).")
    max_studies: int = Field(
        10_000, ge=1, description="Studies one dicomweb:// source may list; narrow it with filters."
    )


class OverLimit(ValueError):
    """A file or a request over one of these limits; the message names the limit (a row's reason, a 400's body)."""


class PixelBudget:
    """Pixels decoded at once (``max_decoding_pixels``), shared by a process's threads: :meth:`hold` waits until a
    decode's pixels fit and gives them back after it (an image larger than the whole budget waits for all of it);
    :meth:`take` spends them for good."""

    def __init__(self, pixels: int):
        self.total = self.free = pixels
        self._room = threading.Condition()

    def take(self, pixels: int) -> bool:
        """Spend ``pixels`` for good when they fit (a request's allowance, ``max_request_pixels``)."""
        with self._room:
            if pixels > self.free:
                return False
            self.free -= pixels
            return True

    @contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.total)
        with self._room:
            self._room.wait_for(lambda: self.free >= pixels)
            self.free -= pixels
        try:
            yield
        finally:
            with self._room:
                self.free += pixels
                self._room.notify_all()
