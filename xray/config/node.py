"""``node:``, the DICOM node (``python3 run.py node``): where it listens, whom it accepts, its spool, what it analyses,
where its results go and what is urgent. Every key has a flag of the same name that overrides it."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from xray.config.base import Section

STORAGE_CLASSES = (
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing",
)
"""The storage classes the node keeps (CR, DX for presentation and for processing); pydicom's keywords."""
_AE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")
_DESTINATION = re.compile(r"^(dicom://[^@/\s]{1,16}@[^:/\s]+:\d{1,5}|dicomwebs?://\S+)$")


def _ae_title(value: str) -> str:
    value = value.strip()
    if not _AE.match(value):
        raise ValueError(f"{value!r} is not an AE title (1 to 16 characters, no backslash or control character)")
    return value


class NodeRules(Section):
    """What the node analyses of what it keeps; an empty list accepts any value. A tag the header lacks passes the
    rule (the header scope of the version, ``scope:``, applies on top and records it)."""

    modalities: tuple[str, ...] = Field(("CR", "DX"), description="Modality values analysed.")
    body_parts: tuple[str, ...] = Field(("CHEST",), description="BodyPartExamined values analysed (when present).")
    views: tuple[str, ...] = Field(("PA", "AP"), description="ViewPosition values analysed (when present).")
    sop_classes: tuple[str, ...] = Field(
        STORAGE_CLASSES, min_length=1, description="Storage classes analysed (a subset of the three the node keeps)."
    )

    @field_validator("modalities", "body_parts", "views")
    @classmethod
    def _upper(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(value.strip().upper() for value in values)

    @field_validator("sop_classes")
    @classmethod
    def _kept(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(values) - set(STORAGE_CLASSES))
        if unknown:
            raise ValueError(f"unknown storage class(es) {unknown}; choose from {list(STORAGE_CLASSES)}")
        return values


class NodeConfig(Section):
    """The DICOM node: a Storage SCP that analyses stable studies and sends the results on (docs/OPERATIONS.md,
    "DICOM node")."""

    host: str = Field("127.0.0.1", description="Address the Storage SCP listens on.")
    port: int = Field(11112, ge=1, le=65535, description="Port the Storage SCP listens on.")
    ae_title: str = Field("XRAY_AI", description="The node's own AE title (the called AE title senders use).")
    allow: tuple[str, ...] = Field(
        ("MODALITY", "ORTHANC"), description="Calling AE titles accepted; any other association is rejected."
    )
    spool: str = Field(".node/spool", description="Where received instances wait (patient data: docs/OPERATIONS.md).")
    stable_seconds: float = Field(10.0, gt=0, description="A study is analysed once no instance came for this long.")
    max_spool_gb: float = Field(10.0, gt=0, description="Above this the node answers C-STORE out of resources.")
    destinations: tuple[str, ...] = Field(
        (), description="Where results go: dicom://AE@HOST:PORT (C-STORE) and dicomweb://HOST:PORT/ROOT (STOW-RS)."
    )
    heatmaps: bool = Field(False, description="Also send the heatmap Segmentation and Secondary Capture of ok images.")
    urgent_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="A probability at or above it is urgent (reported so, and posted to XRAY_ALERT_WEBHOOK); "
        "None: the version's own threshold, the high-sensitivity end of its operating point.",
    )
    attempts: int = Field(5, ge=1, le=20, description="Tries per result and destination before the dead letters.")
    backoff_s: float = Field(1.0, ge=0, description="First wait between tries, doubled at each.")
    build_workers: int = Field(
        2,
        ge=0,
        le=64,
        description="Processes that build the results (highdicom's report costs about twice the int8 prediction) while "
        "the analysis thread predicts the next batch; 0 builds them in the analysis thread.",
    )
    reload_s: float = Field(60.0, gt=0, description="How often the node asks the registry for a new champion.")
    rules: NodeRules = NodeRules()

    @field_validator("ae_title")
    @classmethod
    def _title(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("allow")
    @classmethod
    def _titles(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_ae_title(value) for value in values)

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            if not _DESTINATION.match(value):
                raise ValueError(f"{value!r}: a destination is dicom://AE@HOST:PORT or dicomweb://HOST:PORT/ROOT")
        return values
