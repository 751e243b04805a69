"""``scope:``, the images a version is validated for (the DICOM header's tags it checks)."""

from __future__ import annotations

from pydantic import Field, field_validator

from xray.config.base import Section

SCOPE_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "PatientAge")


class ScopeConfig(Section):
    """The images a version is validated for, checked per DICOM image from its header before its pixels are trusted
    (docs/USER_GUIDE.md, "DICOM"). Stored with each registered version and shown in its model card."""

    modalities: tuple[str, ...] = Field(("CR", "DX"), min_length=1, description="Modality values in scope.")
    body_parts: tuple[str, ...] = Field(
        ("CHEST",), min_length=1, description="BodyPartExamined values in scope (checked when the tag is present)."
    )
    views: tuple[str, ...] = Field(
        ("PA", "AP"), min_length=1, description="ViewPosition values in scope (LL, RL, LATERAL are out)."
    )
    age_years: tuple[float, float] = Field(
        (1, 5),
        description="Validated ages in completed years, both ends included (the Guangzhou children were 1 to 5): "
        "PatientAge, else StudyDate - PatientBirthDate.",
    )
    required: tuple[str, ...] = Field(
        (),
        description=f"Tags whose absence puts an image out of scope ({', '.join(SCOPE_TAGS)}); a missing tag that is "
        "not required is recorded in scope_unchecked and the image is still answered.",
    )

    @field_validator("modalities", "body_parts", "views")
    @classmethod
    def _upper(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(value.strip().upper() for value in values)

    @field_validator("age_years")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError("must be [youngest, oldest] with 0 <= youngest <= oldest")
        return value

    @field_validator("required")
    @classmethod
    def _known(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(values) - set(SCOPE_TAGS))
        if unknown:
            raise ValueError(f"unknown tag(s) {unknown}; choose from {list(SCOPE_TAGS)}")
        return values
