"""Results back to the PACS: one DICOM Structured Report per analysed image, in the image's own study.

Each report is an Enhanced SR (PS3.3 A.35.2) in a new series of the study (one per model version), with a content
tree the PACS viewer shows as text: the source image (its SOP Class and Instance UID, as the evidence), the
probability of pneumonia and the threshold (numeric), the label, the status and its reason, the model's name and
version, and a line that it is not a diagnosis. The concepts are coded in this project's private scheme
(``99XRAY``, PS3.16 8.2: a private scheme starts with 99).

UIDs are derived from the source instance, the model and its version, so a report has one identity: writing it again
stores nothing new, and :class:`ReportWriter` asks the PACS first. The patient and study attributes of a report are
copied from its source image's header (WADO-RS metadata) into the report and the PACS, and nowhere else.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from datetime import datetime

import pandas as pd
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from xray.config.limits import PacsLimits
from xray.monitoring.ood import UNREADABLE
from xray.serving.predictor import UID_COLUMNS
from xray.storage import dicomweb

logger = logging.getLogger(__name__)

SCHEME = "99XRAY"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
DISCLAIMER = (
    "Not a diagnosis. Decision support from a research model that is not a medical device and is not clinically "
    "validated; a clinician must read the image."
)
# Copied from the source image so that the report files under the same patient and study.
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
SERIES_NUMBER = 9900


def _code(value: str, meaning: str, scheme: str = SCHEME):

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _item(value_type: str, code: tuple[str, str], relationship: str = "CONTAINS"):

    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    item.ConceptNameCodeSequence = [_code(*code)]
    return item


def _text(code: tuple[str, str], text: str):
    item = _item("TEXT", code)
    item.TextValue = text[:1024] or "-"
    return item


def _number(code: tuple[str, str], value: float):

    item = _item("NUM", code)
    measured = Dataset()
    measured.NumericValue = f"{value:.6f}"[:16]
    measured.MeasurementUnitsCodeSequence = [_code("1", "no units", "UCUM")]
    item.MeasuredValueSequence = [measured]
    return item


def uids(sop_instance_uid: str, study_uid: str, model: str, version: str) -> tuple[str, str]:
    """(report series UID, report instance UID): one series per study and model version, one report per image."""

    series = generate_uid(entropy_srcs=["xray-sr-series", study_uid, model, str(version)])
    instance = generate_uid(entropy_srcs=["xray-sr", sop_instance_uid, model, str(version)])
    return series, instance


def build(source_header, row: dict, model: str, version: str, when: datetime | None = None) -> bytes:
    """The Part 10 bytes of the report on one prediction ``row`` (a batch inference row), for the source image whose
    header (a pydicom Dataset of its metadata) is ``source_header``."""

    when = when or datetime.now()
    study = str(row["study_instance_uid"])
    series_uid, instance_uid = uids(str(row["sop_instance_uid"]), study, model, version)
    ds = Dataset()
    for keyword in PATIENT_STUDY:
        if keyword in source_header:
            setattr(ds, keyword, source_header.data_element(keyword).value)
    ds.StudyInstanceUID = study
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_SR, instance_uid
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "SR", series_uid, SERIES_NUMBER
    ds.SeriesDescription = f"AI result: {model} v{version}"[:64]
    ds.InstanceNumber = 1
    ds.Manufacturer = "xray-pipeline"
    ds.ContentDate, ds.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("XR-1", "Chest X-ray pneumonia classifier result")]
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    reference = Dataset()
    reference.ReferencedSOPClassUID = str(source_header.get("SOPClassUID", ""))
    reference.ReferencedSOPInstanceUID = str(row["sop_instance_uid"])
    image = _item("IMAGE", ("XR-2", "Source image"))
    image.ReferencedSOPSequence = [reference]
    status = str(row["status"])
    content = [image]
    if pd.notna(row.get("probability")):
        content.append(_number(("XR-3", "Probability of pneumonia"), float(row["probability"])))
    content += [
        _number(("XR-4", "Decision threshold"), float(row["threshold"])),
        _text(("XR-5", "Label"), str(row.get("label") or "none (no label unless the status is ok)")),
        _text(("XR-6", "Status"), status),
        _text(("XR-7", "Reason"), str(row.get("reason") or "")),
        _text(("XR-8", "Model"), model),
        _text(("XR-9", "Model version"), str(version)),
        _text(("XR-10", "Disclaimer"), DISCLAIMER),
    ]
    ds.ContentSequence = content
    evidence_series = Dataset()
    evidence_series.SeriesInstanceUID = str(row["series_instance_uid"])
    evidence_series.ReferencedSOPSequence = [reference]
    evidence = Dataset()
    evidence.StudyInstanceUID = study
    evidence.ReferencedSeriesSequence = [evidence_series]
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ENHANCED_SR, instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _kept(metadata: dict) -> dict:
    """The source's DICOM JSON reduced to what a report copies (no bulk data, nothing else)."""

    wanted = {f"{tag_for_keyword(keyword):08X}" for keyword in (*PATIENT_STUDY, "SOPClassUID")}
    return {tag: value for tag, value in metadata.items() if tag in wanted}


@dataclass
class ReportWriter:
    """Writes back the reports of each predicted batch to the PACS it was read from (STOW-RS into each study)."""

    source: str
    model: str
    version: str
    max_attempts: int = 5
    limits: PacsLimits | None = None
    written: int = 0
    already: int = 0
    invalid_uid: int = 0
    _client: dicomweb.Client | None = field(default=None, repr=False)

    def __post_init__(self):
        if not dicomweb.is_dicomweb(self.source):
            raise dicomweb.DatasetSourceError(
                f"--write-back stores reports in the PACS the images came from: it needs a dicomweb:// source, "
                f"got {self.source}"
            )
        self._client = dicomweb.Client(dicomweb.parse(self.source), self.max_attempts, limits=self.limits)

    def write(self, table: pd.DataFrame) -> None:
        """One report for each analysed row (every status but unreadable) that has none from this version yet."""

        rows = table[(table["status"] != UNREADABLE) & (table["sop_instance_uid"].astype(str) != "")]
        # A header's UIDs go into the PACS's URLs: only those that are UIDs (PS3.5 9.1); the others are counted.
        valid = rows[UID_COLUMNS].map(dicomweb.is_uid).all(axis=1)
        self.invalid_uid += int((~valid).sum())
        rows = rows[valid]
        by_study: dict[str, list[bytes]] = {}
        for row in rows.to_dict("records"):
            study, series, instance = row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"]
            report_series, report = uids(instance, study, self.model, self.version)
            if self._client.exists(study, report_series, report):
                self.already += 1
                continue
            header = Dataset.from_json(_kept(self._client.metadata(study, series, instance)))
            by_study.setdefault(study, []).append(build(header, row, self.model, self.version))
        stored = 0
        for study, reports in by_study.items():
            self._client.store(reports, study)
            stored += len(reports)
        self.written += stored
        if stored:
            logger.info(
                "%d report(s) stored in the PACS (%d in this run, %d already there)", stored, self.written, self.already
            )

    def summary(self) -> dict:
        return {
            "reports_written": self.written,
            "reports_already_in_pacs": self.already,
            "reports_not_written_invalid_uid": self.invalid_uid,
        }
