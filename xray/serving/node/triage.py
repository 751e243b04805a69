"""Triage: a result at or above the urgent threshold is marked urgent in its report and posted to the alert webhook
(``XRAY_ALERT_WEBHOOK``) with the study UID and the probability only.

The threshold is ``node.urgent_threshold``; by default the version's own threshold, the high-sensitivity end of its
operating point (``evaluate.threshold_policy: min_sensitivity`` picks it for a sensitivity of at least
``evaluate.min_sensitivity``, 0.95): every image the model calls PNEUMONIA is urgent, because a miss costs more than
a look. Only an ``ok`` row is urgent: an image out of scope or out of distribution has no verdict to act on.

In the report, the urgency is one more qualitative evaluation of its TID 1501 group, in the report's private scheme
(``99XRAY``): "Triage" = "Urgent" (docs/USER_GUIDE.md lists the codes)."""

from __future__ import annotations

import logging
import math

import highdicom as hd
from highdicom.sr import CodedConcept

from xray.monitoring.alerts import post_alert
from xray.monitoring.ood import OK
from xray.serving.sr import SCHEME

logger = logging.getLogger(__name__)

TRIAGE = CodedConcept("XR-TRIAGE", SCHEME, "Triage")
URGENT = CodedConcept("XR-URGENT", SCHEME, "Urgent")


def threshold_of(setting: float | None, version_threshold: float) -> float:
    """The urgent threshold: the configured one, else the version's own."""
    return float(version_threshold if setting is None else setting)


def is_urgent(row: dict, threshold: float) -> bool:
    probability = row.get("probability")
    if row.get("status") != OK or probability is None or not math.isfinite(float(probability)):
        return False
    return float(probability) >= threshold


def mark(report, urgent: bool) -> None:
    """Add "Triage: Urgent" to the report's measurement group (an urgent result only)."""
    if not urgent:
        return
    for item in report.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "126010":  # Imaging Measurements
            group = item.ContentSequence[0]
            group.ContentSequence.append(hd.sr.QualitativeEvaluation(TRIAGE, URGENT)[0])
            return
    raise ValueError("the report has no measurement group to mark")


def alert(study_uid: str, probability: float, url: str | None = None) -> bool:
    """Post the urgent study: its UID and the probability, nothing else; False when no webhook is set or it failed."""
    return post_alert(f"urgent chest X-ray: study {study_uid} P(pneumonia) {float(probability):.3f}", url=url)
