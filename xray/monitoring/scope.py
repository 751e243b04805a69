"""Scope from the header: whether a DICOM image is of the kind a version was validated on, before its pixels are
trusted.

The pixels cannot tell a 45-year-old's chest from a 4-year-old's reliably (the out-of-distribution check flags 67%
of adult X-rays); the header says so exactly. Each check reads one tag of :class:`xray.data.dicom.DicomHeader`
against the version's :class:`xray.config.scope.ScopeConfig`: Modality, BodyPartExamined (when present),
ViewPosition and the age. A tag that is absent is recorded in ``unchecked`` (and puts the image out of scope only
when the scope requires it). Images without a header (JPEG, PNG) are not checked here; the pixel-level checks run on
every image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from xray.config.scope import ScopeConfig
from xray.data.dicom import DicomHeader

OUT_OF_SCOPE = "out_of_scope"


@dataclass
class ScopeResult:
    reasons: list[str] = field(default_factory=list)
    """One line per failed check, naming the tag and its value; empty when in scope."""
    unchecked: list[str] = field(default_factory=list)
    """Tags the header lacks, so their check could not run."""

    @property
    def in_scope(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _years(value: float) -> str:
    return f"{value:g}"


def check(header: DicomHeader | None, scope: ScopeConfig) -> ScopeResult:
    """The scope checks of one image; an image without a DICOM header passes unchecked (nothing to read)."""
    result = ScopeResult()
    if header is None:
        return result

    def missing(tag: str) -> None:
        if tag in scope.required:
            result.reasons.append(f"{tag} missing, and the scope requires it")
        else:
            result.unchecked.append(tag)

    for tag, value, allowed in (
        ("Modality", header.modality, scope.modalities),
        ("BodyPartExamined", header.body_part, scope.body_parts),
        ("ViewPosition", header.view_position, scope.views),
    ):
        if not value:
            missing(tag)
        elif value not in allowed:
            result.reasons.append(f"{tag} {value} outside the validated {', '.join(allowed)}")
    youngest, oldest = scope.age_years
    validated = f"{_years(youngest)}-{_years(oldest)} years"
    if header.age_years is None:
        missing("PatientAge")
    elif not youngest <= math.floor(header.age_years + 1e-9) <= oldest:
        if header.age_source == "PatientAge":
            result.reasons.append(f"PatientAge {header.patient_age} outside the validated {validated}")
        else:
            years = math.floor(header.age_years)
            shown = "over 89" if years >= 90 else str(years)
            result.reasons.append(f"age {shown} years ({header.age_source}) outside the validated {validated}")
    return result


def describe(scope: ScopeConfig) -> list[str]:
    """The scope in words, a line per check (the model card's section)."""
    required = ", ".join(scope.required) or "none (a missing tag is recorded in scope_unchecked)"
    youngest, oldest = scope.age_years
    return [
        f"Modality: {', '.join(scope.modalities)}",
        f"BodyPartExamined: {', '.join(scope.body_parts)} (when present)",
        f"ViewPosition: {', '.join(scope.views)}",
        f"Age: {_years(youngest)} to {_years(oldest)} completed years (PatientAge, else StudyDate - PatientBirthDate)",
        f"Tags required: {required}",
    ]
