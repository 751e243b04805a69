"""Results back to the PACS as a radiologist's viewer reads them (IHE AI Results; docs/USER_GUIDE.md has the content).

**The report** (:func:`report`), one per analysed image: a Comprehensive 3D SR (highdicom) on the TID 1500 template,
the model as its device observer (TID 1004, a Device Observer UID per model version), the procedure reported, the
source image in the image library and as the evidence, and one TID 1501 group: the algorithm (TID 4019, the threshold
as its parameter) and, for status ``ok``, the probability (UCUM ``1``) and SNOMED CT "Pneumonia" present or absent;
for any other status, the status and its reason, and no probability or finding (a viewer would read them as the
model's verdict). Every group says it is not a diagnosis. Private codes (``99XRAY``) only where no standard one
exists: :data:`PRIVATE_CODES`.

**The heatmap** of an ``ok`` image, when asked: a FRACTIONAL Segmentation on the source's pixel grid
(:func:`heatmap_segmentation`) and an RGB Secondary Capture with the probability, label, model version and "NOT A
DIAGNOSIS" burned in (:func:`heatmap_capture`), both referred to from the report written with them.

UIDs derive from the source instance, the model and its version (:func:`identities`); :class:`ReportWriter` asks
the PACS first. Only the patient and study modules of the source's header are copied, with pydicom's and highdicom's
warnings (which quote header values) silenced."""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
import pandas as pd
from highdicom.sr import CodedConcept
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGLSLossless, RLELossless, SecondaryCaptureImageStorage, generate_uid

from xray import CLASS_NAMES
from xray.config.limits import PacsLimits
from xray.data.dicom import redact
from xray.data.images import decode_image
from xray.errors import DatasetSourceError
from xray.model import gradcam
from xray.monitoring.ood import OK, OUT_OF_DISTRIBUTION, UNREADABLE
from xray.monitoring.scope import OUT_OF_SCOPE
from xray.serving.predictor import UID_COLUMNS
from xray.storage import dicomweb

logger = logging.getLogger(__name__)

MANUFACTURER = "xray-pipeline"
DISCLAIMER = (
    "Not a diagnosis. Decision support from a research model that is not a medical device and is not clinically "
    "validated; a clinician must read the image."
)
SCHEME = "99XRAY"
PNEUMONIA = CodedConcept("233604007", "SCT", "Pneumonia")
CHEST_RADIOGRAPH = CodedConcept("399208008", "SCT", "Plain chest X-ray")
STATUS = CodedConcept("XR-STATUS", SCHEME, "Analysis status")
REASON = CodedConcept("XR-REASON", SCHEME, "Reason for the analysis status")
STATUSES = {
    OK: CodedConcept("XR-OK", SCHEME, "In scope and like the training images"),
    OUT_OF_SCOPE: CodedConcept("XR-OUT-OF-SCOPE", SCHEME, "Out of scope"),
    OUT_OF_DISTRIBUTION: CodedConcept("XR-OUT-OF-DIST", SCHEME, "Out of distribution"),
}
PRIVATE_CODES = [STATUS, REASON, *STATUSES.values()]
"""Every private code a report may carry (docs/USER_GUIDE.md lists them with their meaning)."""
PATIENT_STUDY = tuple(
    "PatientName PatientID IssuerOfPatientID PatientBirthDate PatientSex StudyInstanceUID StudyDate StudyTime "
    "ReferringPhysicianName StudyID AccessionNumber StudyDescription".split()
)
"""The patient and study modules' attributes copied from the source image; Type 2 ones are written empty when absent."""
SOURCE_IMAGE = tuple(
    "SOPClassUID SOPInstanceUID SeriesInstanceUID Modality Rows Columns PatientOrientation ImagerPixelSpacing".split()
)
"""What else is read of the source's header: the reference to the image, its pixel grid and library descriptors."""
SERIES_NUMBERS = {"report": 9900, "segmentation": 9901, "capture": 9902}
CAPTURE_SIDE, CAPTURE_WIDTH = 1024, 512
"""A Secondary Capture's longest side and least width (pixels): a picture beside the image, with a readable caption."""
STOW_OBJECTS = 16
"""Objects per STOW-RS request (a heatmap's two objects are up to a few MB)."""


@dataclass(frozen=True)
class Identities:
    """The UIDs of what one model version writes for one source image (and of the version as a device)."""

    report_series: str
    report: str
    segmentation_series: str
    segmentation: str
    capture_series: str
    capture: str
    tracking: str
    device: str


def identities(sop_instance_uid: str, study_uid: str, model: str, version: str) -> Identities:
    """One series per study, model version and kind of object, one object of each kind per source image."""

    def uid(*parts: str) -> str:
        return generate_uid(entropy_srcs=[*parts, model, str(version)])

    return Identities(
        # The report's are those of the Enhanced SR this module wrote before: one report per image and version.
        report_series=uid("xray-sr-series", study_uid),
        report=uid("xray-sr", sop_instance_uid),
        segmentation_series=uid("xray-seg-series", study_uid),
        segmentation=uid("xray-seg", sop_instance_uid),
        capture_series=uid("xray-sc-series", study_uid),
        capture=uid("xray-sc", sop_instance_uid),
        tracking=uid("xray-tracking", sop_instance_uid),
        device=uid("xray-device"),
    )


def source_header(metadata: dict) -> Dataset:
    """The source's WADO-RS metadata (DICOM JSON) reduced to :data:`PATIENT_STUDY` and :data:`SOURCE_IMAGE`, with
    every patient and study attribute present (empty when the source has none)."""
    wanted = {f"{tag_for_keyword(keyword):08X}" for keyword in (*PATIENT_STUDY, *SOURCE_IMAGE)}
    with _quiet():
        header = Dataset.from_json({tag: value for tag, value in metadata.items() if tag in wanted})
        for keyword in PATIENT_STUDY:
            if keyword not in header:
                setattr(header, keyword, None)
    return header


@contextmanager
def _quiet():
    """pydicom's and highdicom's warnings and log lines quote header values (an invalid date, a one-part person name):
    silenced while a source header is read or an object built."""
    for name in ("pydicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _building(build):
    """``build`` run :func:`_quiet`; an error becomes one line with every identifying value of the header redacted."""

    def built(source: Dataset, *args, **kwargs):
        with _quiet():
            try:
                return build(source, *args, **kwargs)
            except (AttributeError, KeyError, TypeError, ValueError) as error:
                message = redact(str(error).splitlines()[0] if str(error) else "", source)
                raise DatasetSourceError(
                    f"cannot build the {build.__name__.replace('_', ' ')} of instance {source.SOPInstanceUID}: "
                    f"{type(error).__name__}: {message}"[:300]
                ) from None

    built.__name__, built.__doc__ = build.__name__, build.__doc__
    return built


def _algorithm(row: dict, model: str, version: str) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model,
        version=str(version),
        parameters=[f"threshold {float(row['threshold']):.6g}"],
        family=codes.DCM.ArtificialIntelligence,
    )


def _library_entry(source: Dataset) -> Dataset:
    """The source as highdicom's image library reads it: TID 1603's projection descriptors (orientation, imager pixel
    spacing) where the header has them, none where it lacks them (highdicom picks the set by Modality)."""
    if "PatientOrientation" in source and "ImagerPixelSpacing" in source and "Modality" in source:
        return source
    entry = Dataset(source)
    entry.Modality = ""
    return entry


@_building
def report(source: Dataset, row: dict, model: str, version: str, heatmaps: tuple = ()) -> hd.sr.Comprehensive3DSR:
    """The report on one prediction ``row`` (a batch inference row) of the image whose header (:func:`source_header`)
    is ``source``; ``heatmaps``: its heatmap objects, referred to from the report and listed in its evidence."""
    ids = identities(str(source.SOPInstanceUID), str(source.StudyInstanceUID), model, version)
    status = str(row["status"])
    algorithm = _algorithm(row, model, version)
    evaluations = [hd.sr.QualitativeEvaluation(STATUS, STATUSES[status])]
    measurements = None
    if status == OK:
        present = row["label"] == CLASS_NAMES[1]
        evaluations.insert(
            0, hd.sr.QualitativeEvaluation(PNEUMONIA, codes.SCT.Present if present else codes.SCT.Absent)
        )
        measurements = [
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=round(float(row["probability"]), 6),
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
            )
        ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=ids.tracking, identifier="AI pneumonia classification"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    items = group[0].ContentSequence
    if status != OK:
        items.append(hd.sr.TextContentItem(REASON, str(row.get("reason") or status)[:1024], "CONTAINS"))
    items.append(hd.sr.TextContentItem(codes.DCM.Comment, DISCLAIMER, "CONTAINS"))
    for heatmap in heatmaps:
        items.append(
            hd.sr.ImageContentItem(
                codes.DCM.VisualExplanation, heatmap.SOPClassUID, heatmap.SOPInstanceUID, relationship_type="CONTAINS"
            )
        )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=ids.device, name=f"{model} v{version}"[:64], manufacturer_name=MANUFACTURER, model_name=model[:64]
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device)
        ),
        procedure_reported=CHEST_RADIOGRAPH,
        imaging_measurements=[group],
        referenced_images=[_library_entry(source)],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[source, *heatmaps],
        content=content,
        series_instance_uid=ids.report_series,
        series_number=SERIES_NUMBERS["report"],
        sop_instance_uid=ids.report,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"AI result: {model} v{version}"[:64],
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(SCHEME, "xray-pipeline private codes")],
    )


def _towards(row: dict) -> str:
    return str(row["label"] or CLASS_NAMES[0])


@_building
def heatmap_segmentation(source: Dataset, row: dict, heatmap: np.ndarray, model: str, version: str):
    """The Grad-CAM of an ``ok`` row as a FRACTIONAL Segmentation (probability) on the source's pixel grid."""
    ids = identities(str(source.SOPInstanceUID), str(source.StudyInstanceUID), model, version)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=f"Grad-CAM toward {_towards(row)}",
        segmented_property_category=codes.DCM.VisualExplanation,
        segmented_property_type=codes.DCM.GradientWeightedClassActivation,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model,
            family=codes.DCM.ArtificialIntelligence,
            version=str(version),
            parameters={"threshold": f"{float(row['threshold']):.6g}"},
        ),
    )
    segmentation = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=gradcam.stretched(heatmap, int(source.Rows), int(source.Columns)),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        segment_descriptions=[description],
        series_instance_uid=ids.segmentation_series,
        series_number=SERIES_NUMBERS["segmentation"],
        sop_instance_uid=ids.segmentation,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model[:64],
        software_versions=str(version),
        device_serial_number=ids.device,
        content_label="GRADCAM",
        content_description="Where the model looked (Grad-CAM); not a diagnosis"[:64],
        series_description=f"AI heatmap: {model} v{version}"[:64],
        omit_empty_frames=False,
        transfer_syntax_uid=JPEGLSLossless,
    )
    segmentation.PatientOrientation = source.get("PatientOrientation") or None  # Type 2C: empty when unknown
    return segmentation


def caption(row: dict, model: str, version: str) -> list[str]:
    """The lines burned into a Secondary Capture."""
    return [
        "NOT A DIAGNOSIS: research model, a clinician must read the image",
        f"P(pneumonia) {float(row['probability']):.3f}, threshold {float(row['threshold']):.3f}: {_towards(row)}",
        f"{model} v{version}, Grad-CAM toward {_towards(row)}",
    ]


@_building
def heatmap_capture(source: Dataset, row: dict, heatmap: np.ndarray, picture: np.ndarray, model: str, version: str):
    """The Grad-CAM of an ``ok`` row over the image (``picture``: its displayed grey pixels), with its caption burned
    in, as an RGB Secondary Capture in the source's study."""
    ids = identities(str(source.SOPInstanceUID), str(source.StudyInstanceUID), model, version)
    orientation = list(source.get("PatientOrientation") or [])
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=gradcam.captioned(picture, heatmap, caption(row, model, version), CAPTURE_SIDE, CAPTURE_WIDTH),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        # highdicom wants an orientation for a patient's image; the source's is kept (Type 2C: empty when unknown).
        patient_orientation=tuple(orientation) if len(orientation) == 2 else ("L", "F"),
        series_instance_uid=ids.capture_series,
        series_number=SERIES_NUMBERS["capture"],
        sop_instance_uid=ids.capture,
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=f"AI heatmap image: {model} v{version}"[:64],
        transfer_syntax_uid=RLELossless,
    )
    capture.PatientOrientation = orientation if len(orientation) == 2 else None
    capture.BodyPartExamined = "CHEST"  # what the capture shows (the procedure reported); a chest has no laterality
    capture.BurnedInAnnotation = "YES"
    capture.DerivationDescription = "Grad-CAM of an AI model over the source image; not a diagnosis"
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    capture.SourceImageSequence = [reference]
    return capture


def is_own_capture(metadata: dict) -> bool:
    """Whether an instance's WADO-RS metadata is a Secondary Capture this project wrote (:func:`heatmap_capture`)."""
    values = {tag: (metadata.get(tag, {}).get("Value") or [""])[0] for tag in ("00080016", "00080070")}
    return values == {"00080016": SecondaryCaptureImageStorage, "00080070": MANUFACTURER}


def part10(dataset: Dataset) -> bytes:
    """A built object as the bytes of a DICOM file (what STOW-RS stores)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class ReportWriter:
    """Writes each predicted batch's results back to the PACS it was read from (STOW-RS into each image's study):
    one report per analysed image and, with ``heatmaps``, the two heatmap objects of each ``ok`` one, each object
    stored only when the PACS lacks it.

    With ``heatmaps``, ``predictor`` (the :class:`xray.serving.predictor.ChestXrayPredictor` the batch ran on) gives
    the Keras model and input size for Grad-CAM; each ``ok`` image is read again over WADO-RS for it (the batch stream
    keeps no image once its rows are written)."""

    source: str
    model: str
    version: str
    max_attempts: int = 5
    limits: PacsLimits | None = None
    heatmaps: bool = False
    predictor: object | None = field(default=None, repr=False)
    written: int = 0
    already: int = 0
    invalid_uid: int = 0
    heatmaps_written: int = 0
    heatmaps_already: int = 0
    own_captures: int = 0
    _client: dicomweb.Client | None = field(default=None, repr=False)

    def __post_init__(self):
        if not dicomweb.is_dicomweb(self.source):
            raise DatasetSourceError(
                f"--write-back stores reports in the PACS the images came from: it needs a dicomweb:// source, "
                f"got {self.source}"
            )
        if self.heatmaps and self.predictor is None:
            raise ValueError("heatmaps need the predictor whose model made the predictions (Grad-CAM)")
        self._client = dicomweb.Client(dicomweb.parse(self.source), self.max_attempts, limits=self.limits)

    def write(self, table: pd.DataFrame) -> None:
        """Each analysed row's objects (every status but unreadable) that the PACS does not hold yet; a row of one of
        this project's own heatmap captures (an image, so listed and predicted) gets none."""
        rows = table[(table["status"] != UNREADABLE) & (table["sop_instance_uid"].astype(str) != "")]
        # A header's UIDs go into the PACS's URLs: only those that are UIDs (PS3.5 9.1); the others are counted.
        valid = rows[UID_COLUMNS].map(dicomweb.is_uid).all(axis=1)
        self.invalid_uid += int((~valid).sum())
        rows = rows[valid]
        pending = []
        for row in rows.to_dict("records"):
            study, series, instance = row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"]
            ids = identities(instance, study, self.model, self.version)
            missing = {"report": not self._client.exists(study, ids.report_series, ids.report)}
            if self.heatmaps and row["status"] == OK:
                missing["segmentation"] = not self._client.exists(study, ids.segmentation_series, ids.segmentation)
                missing["capture"] = not self._client.exists(study, ids.capture_series, ids.capture)
            if not any(missing.values()):
                self.already += 1
                self.heatmaps_already += len(missing) > 1
                continue
            metadata = self._client.metadata(study, series, instance)
            if is_own_capture(metadata):
                self.own_captures += 1
                continue
            self.already += not missing["report"]
            pending.append((row, missing, source_header(metadata)))
        # The heatmaps of every row that needs one, in one Grad-CAM call (a report refers to its row's heatmaps).
        explained = self._explain([row for row, missing, _ in pending if len(missing) > 1])
        to_store: dict[str, list[bytes]] = {}
        for row, missing, header in pending:
            study, instance = row["study_instance_uid"], row["sop_instance_uid"]
            made = {}
            if instance in explained:
                heatmap, picture = explained[instance]
                made["segmentation"] = heatmap_segmentation(header, row, heatmap, self.model, self.version)
                made["capture"] = heatmap_capture(header, row, heatmap, picture, self.model, self.version)
            if missing["report"]:
                made["report"] = report(header, row, self.model, self.version, tuple(made.values()))
            to_store.setdefault(study, []).extend(part10(made[kind]) for kind in made if missing[kind])
            self.written += missing["report"]
            self.heatmaps_written += missing.get("segmentation", False) or missing.get("capture", False)
        for study, objects in to_store.items():
            for start in range(0, len(objects), STOW_OBJECTS):
                self._client.store(objects[start : start + STOW_OBJECTS], study)
        if to_store:
            counts = (self.written, self.heatmaps_written, self.already, self.heatmaps_already)
            logger.info("PACS: %d report(s), %d image(s)' heatmaps stored in this run; %d, %d already there", *counts)

    def _explain(self, rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{SOP Instance UID: (Grad-CAM toward the row's label, the displayed grey pixels)} of ``ok`` rows, each image
        read again from the PACS and decoded by the one decode path."""
        encoded, pictures = [], []
        for row in rows:
            uids = (row["study_instance_uid"], row["series_instance_uid"], row["sop_instance_uid"])
            data = self._client.retrieve(*uids)
            check, image = decode_image(data)
            if not check.ok:
                raise DatasetSourceError(f"instance {uids[2]} cannot be decoded again for its heatmap: {check.reason}")
            encoded.append(check.converted or data)
            picture = image.convert("L")
            picture.thumbnail((CAPTURE_SIDE, CAPTURE_SIDE))
            pictures.append(np.asarray(picture))
        if not rows:
            return {}
        pixels = gradcam.pixels_of(encoded, self.predictor.image_size)
        towards = [row["label"] == CLASS_NAMES[1] for row in rows]
        maps = gradcam.heatmaps(self.predictor.model, pixels, self.predictor.threshold, towards)
        return {row["sop_instance_uid"]: (heatmap, picture) for row, heatmap, picture in zip(rows, maps, pictures)}

    def summary(self) -> dict:
        return {
            "reports_written": self.written,
            "reports_already_in_pacs": self.already,
            "reports_not_written_invalid_uid": self.invalid_uid,
            "heatmaps_written": self.heatmaps_written,
            "heatmaps_already_in_pacs": self.heatmaps_already,
            "own_captures_skipped": self.own_captures,
        }
