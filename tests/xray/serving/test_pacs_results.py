"""What goes back to the PACS (xray/serving/sr.py): the TID 1500 report of each analysed image and the heatmap
objects of each ok one, built from every DICOM variant the suite makes, checked by validators no one here wrote:
dciodvfy (dicom3tools) on every object, dsrdump +Pt (dcmtk) on every report, and dcmjs (OHIF's parser) in Node.js
reading the finding and the probability back."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_tools import dciodvfy_errors, dcmjs_reports, dsrdump
from fixtures.dicom_factory import SENTINELS, radiograph
from support import radiograph_like
from xray.data.images import decode_image
from xray.errors import DatasetSourceError
from xray.serving import sr

MODEL, VERSION = "chest-xray-classifier", "3"
VARIANTS = {
    "8-bit": {"bits": 8},
    "12-bit": {"bits": 12},
    "16-bit": {"bits": 16},
    "monochrome1": {"photometric": "MONOCHROME1"},
    "rescale": {"rescale": (2, -1024)},
    "voi-lut": {"voi": "lut"},
    "sigmoid-window": {"voi": "sigmoid"},
    "no-voi": {"voi": "none", "bits": 16},
    "rle": {"syntax": "rle"},
    "jpeg-baseline": {"bits": 8, "syntax": "jpeg-baseline"},
    "jpeg-lossless": {"syntax": "jpeg-lossless"},
    "jpeg-ls": {"syntax": "jpeg-ls"},
    "jpeg2000": {"syntax": "jpeg2000-lossless"},
    # Type 2 values the source lacks (and the Type 1 ones of a DX image that the factory never writes)
    "missing-type-2": {"StudyDate": None, "PatientSex": None, "StudyTime": None, "PatientName": None},
    # the DX image's orientation and detector spacing: the image library's projection descriptors (TID 1603)
    "projection": {"PatientOrientation": ["L", "F"], "ImagerPixelSpacing": ["0.139", "0.139"]},
    "sentinels": {"sentinels": True, "StudyTime": "101500", "PatientOrientation": ["L", "F"]},
}
OK_ROW = {"status": "ok", "probability": 0.8731234, "threshold": 0.41, "label": "PNEUMONIA", "reason": ""}
NOT_OK = {
    "out_of_scope": "PatientAge 045Y outside the validated 1-5 years",
    "out_of_distribution": "ood_score 9.1 above the reference's 99th percentile",
}


def metadata_of(data: bytes) -> dict:
    """An instance's header as WADO-RS metadata gives it (DICOM JSON, the pixel data as a bulk data URI)."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    return dataset.to_json_dict(1024, lambda element: "http://pacs/bulk")


def blob(size: int = 32, centre=(0.25, 0.75)) -> np.ndarray:
    """A heatmap at the model's input size with one peak, at (row, column) fractions ``centre``."""
    y, x = np.mgrid[0:size, 0:size] / size
    return np.exp(-(((y - centre[0]) / 0.1) ** 2 + ((x - centre[1]) / 0.1) ** 2)).astype(np.float32)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{variant: (source bytes, header, {kind: (dataset, path)}, row)}: a report with its heatmaps per variant (the
    last variant's row is a NORMAL call), and the report of each other status for two of them."""
    folder = tmp_path_factory.mktemp("written")
    grey = radiograph_like(np.random.default_rng(5), size=120)[:, 12:108, 0]  # 120 x 96: not square
    made = {}
    for index, (name, options) in enumerate(VARIANTS.items()):
        data = radiograph(grey, **options)
        header = sr.source_header(metadata_of(data))
        check, image = decode_image(data)
        row = OK_ROW | ({"label": "NORMAL", "probability": 0.12} if name == "sentinels" else {})
        segmentation = sr.heatmap_segmentation(header, row, blob(), MODEL, VERSION)
        capture = sr.heatmap_capture(header, row, blob(), np.asarray(image.convert("L")), MODEL, VERSION)
        objects = {
            "segmentation": segmentation,
            "capture": capture,
            "report": sr.report(header, row, MODEL, VERSION, (segmentation, capture)),
        }
        if name in ("12-bit", "missing-type-2"):
            for status, reason in NOT_OK.items():
                objects[status] = sr.report(header, {**OK_ROW, "status": status, "reason": reason}, MODEL, VERSION)
        paths = {}
        for kind, dataset in objects.items():
            paths[kind] = folder / f"{index:02d}-{name}-{kind}.dcm"
            paths[kind].write_bytes(sr.part10(dataset))
        made[name] = (data, header, {kind: (objects[kind], paths[kind]) for kind in objects}, row)
    return made


def test_every_object_written_from_every_variant_passes_dciodvfy(written):
    errors = {
        path.name: found
        for _, _, objects, _ in written.values()
        for _, path in objects.values()
        if (found := dciodvfy_errors(path))
    }
    assert not errors, errors
    assert sum(len(objects) for _, _, objects, _ in written.values()) == 3 * len(VARIANTS) + 4


def test_dcmtk_reads_every_report_without_a_warning_and_names_its_templates(written):
    reports = [
        path
        for _, _, objects, _ in written.values()
        for kind, (_, path) in objects.items()
        if kind
        not in (
            "segmentation",
            "capture",
        )
    ]
    for path in reports:
        result = dsrdump(path)
        assert result.returncode == 0 and result.stderr == "", (path.name, result.stderr)
        assert "Comprehensive 3D SR Document" in result.stdout
        assert '(,,"Imaging Measurement Report")=CONTINUOUS>  # TID 1500 (DCMR)' in result.stdout
        assert '(,,"Measurement Group")=CONTINUOUS>  # TID 1501 (DCMR)' in result.stdout
        assert '(,,"Procedure reported")=(399208008,SCT,"Plain chest X-ray")' in result.stdout


def test_a_viewers_parser_reads_the_finding_and_the_probability_of_each_report(written):
    """dcmjs, in Node.js, on every report: TID 1500, the device observer of this model version, the source image,
    then for ok the probability (UCUM 1) and pneumonia (SNOMED CT) present or absent, for other statuses the status
    and reason and no probability or finding; the disclaimer in each."""
    reports = [
        (path, kind, header, row)
        for _, header, objects, row in written.values()
        for kind, (_, path) in objects.items()
        if kind not in ("segmentation", "capture")
    ]
    read = dcmjs_reports([path for path, *_ in reports])
    pneumonia = {"value": "233604007", "scheme": "SCT", "meaning": "Pneumonia"}
    for (path, kind, header, row), found in zip(reports, read):
        ids = sr.identities(header.SOPInstanceUID, header.StudyInstanceUID, MODEL, VERSION)
        assert found["template"] == "1500" and found["mappingResource"] == "DCMR", path.name
        assert found["title"]["value"] == "126000" and found["deviceObserverUID"] == ids.device
        (group,) = found["groups"]
        assert group["sourceSOPInstanceUID"] == header.SOPInstanceUID
        codes = {c["concept"]["value"]: c["value"] for c in group["codes"]}
        texts = {t["concept"]["meaning"]: t["value"] for t in group["texts"]}
        assert texts["Comment"] == sr.DISCLAIMER and "Not a diagnosis" in texts["Comment"]
        assert texts["Algorithm Name"] == MODEL and texts["Algorithm Version"] == VERSION
        assert texts["Algorithm Parameters"] == "threshold 0.41"
        if kind == "report":
            (probability,) = group["numbers"]
            assert probability["concept"] == {"value": "122157", "scheme": "DCM", "meaning": "Probability"}
            assert probability["unit"]["value"] == "1" and probability["unit"]["scheme"] == "UCUM"
            assert probability["value"] == pytest.approx(row["probability"], abs=1e-6)
            expected = ("52101004", "Present") if row["label"] == "PNEUMONIA" else ("272519000", "Absent")
            assert [c["concept"] for c in group["codes"] if c["concept"]["value"] == "233604007"] == [pneumonia]
            assert (codes["233604007"]["value"], codes["233604007"]["meaning"]) == expected
            assert codes["XR-STATUS"]["value"] == "XR-OK"
            heatmaps = {image["sopInstanceUID"] for image in group["images"] if image["concept"]["value"] == "130401"}
            assert heatmaps == {ids.segmentation, ids.capture}
        else:
            assert group["numbers"] == [] and "233604007" not in codes
            assert codes["XR-STATUS"] == {
                "value": sr.STATUSES[kind].value,
                "scheme": "99XRAY",
                "meaning": sr.STATUSES[kind].meaning,
            }
            assert texts["Reason for the analysis status"] == NOT_OK[kind]


def test_one_identity_per_result_and_a_new_version_is_a_new_series_and_device():
    source, study = generate_uid(), generate_uid()
    ids = sr.identities(source, study, MODEL, "3")
    assert ids == sr.identities(source, study, MODEL, "3")
    # The report keeps the identity of the Enhanced SR written before: an image analysed then is not reported twice.
    assert ids.report == generate_uid(entropy_srcs=["xray-sr", source, MODEL, "3"])
    assert ids.report_series == generate_uid(entropy_srcs=["xray-sr-series", study, MODEL, "3"])
    other = sr.identities(source, study, MODEL, "4")
    assert not set(vars(ids).values()) & set(vars(other).values())
    assert len(set(vars(ids).values())) == len(vars(ids))
    # One series per study and version, whatever the image.
    assert sr.identities(generate_uid(), study, MODEL, "3").report_series == ids.report_series


def test_patient_and_study_come_from_the_source_and_nothing_else_of_it(written):
    data, header, objects, _ = written["sentinels"]
    source = pydicom.dcmread(io.BytesIO(data))
    copied = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyID", "ReferringPhysicianName")
    not_copied = [value for keyword, value in SENTINELS.items() if keyword not in (*copied, "StudyDescription")]
    for kind, (dataset, path) in objects.items():
        for keyword in (*copied, "StudyInstanceUID", "StudyDate", "StudyTime", "PatientSex"):
            assert str(dataset[keyword].value) == str(source[keyword].value), (kind, keyword)
        assert not [value for value in not_copied if value.encode() in path.read_bytes()], kind
    # A source without them: every Type 2 attribute of the patient and study modules is there, empty.
    _, _, objects, _ = written["missing-type-2"]
    for kind, (dataset, _) in objects.items():
        for keyword in ("PatientName", "PatientSex", "StudyDate", "StudyTime", "PatientID", "StudyID"):
            assert keyword in dataset and dataset[keyword].value in ("", None), (kind, keyword)


def test_the_image_library_describes_the_projection_where_the_header_does(written):
    """TID 1603's orientation and detector spacing for a header that has them, nothing invented for one without."""
    described = dsrdump(written["projection"][2]["report"][1]).stdout
    assert '(,,"Patient Orientation Row")="L"' in described
    assert '(,,"Patient Orientation Column")="F"' in described and '(,,"Horizontal Pixel Spacing")="0.139"' in described
    assert "Patient Orientation Row" not in dsrdump(written["12-bit"][2]["report"][1]).stdout


def test_the_heatmap_lies_on_the_source_grid_and_the_capture_says_what_it_is(written):
    _, header, objects, row = written["12-bit"]
    segmentation, _ = objects["segmentation"]
    assert segmentation.SegmentationType == "FRACTIONAL" and segmentation.SegmentationFractionalType == "PROBABILITY"
    frame = segmentation.pixel_array
    assert frame.shape == (header.Rows, header.Columns) == (120, 96)
    peak = np.unravel_index(np.argmax(frame), frame.shape)
    assert peak[0] / 120 == pytest.approx(0.25, abs=0.03) and peak[1] / 96 == pytest.approx(0.75, abs=0.03)
    segment = segmentation.SegmentSequence[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "130403"  # Gradient-weighted class activation
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "130401"  # Visual explanation
    assert segmentation.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        header.SOPInstanceUID
    )
    capture, _ = objects["capture"]
    assert capture.BurnedInAnnotation == "YES" and capture.SourceImageSequence[0].ReferencedSOPInstanceUID == (
        header.SOPInstanceUID
    )
    # The picture keeps the source's aspect under its caption band, wide enough for the caption to be read.
    assert capture.Columns == sr.CAPTURE_WIDTH and capture.Rows > round(120 / 96 * sr.CAPTURE_WIDTH)
    band = capture.pixel_array[: capture.Rows - round(120 / 96 * sr.CAPTURE_WIDTH)]
    assert band.std() > 10  # the text is drawn
    lines = sr.caption(row, MODEL, VERSION)
    assert lines[0].startswith("NOT A DIAGNOSIS") and "0.873" in lines[1] and "PNEUMONIA" in lines[1]
    assert f"{MODEL} v{VERSION}" in lines[2]


def test_building_says_nothing_identifying(caplog, capsys):
    """highdicom warns with a one-part person name in its message, and a malformed birth date fails in it: no
    warning, log line or error carries a value of the source."""
    caplog.set_level(logging.DEBUG)
    grey = radiograph_like(np.random.default_rng(6), size=64)[..., 0]
    metadata = metadata_of(radiograph(grey, sentinels=True, PatientName="ZZSENTINELNAME"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = sr.report(sr.source_header(metadata), OK_ROW, MODEL, VERSION)
        assert report.PatientName == "ZZSENTINELNAME"  # in the object, by design
        metadata["00100030"]["Value"] = ["ZZSENTBIRTH"]  # PatientBirthDate, as a PACS may hold it
        header = sr.source_header(metadata)
        with pytest.raises(DatasetSourceError) as error:
            sr.report(header, OK_ROW, MODEL, VERSION)
    texts = [str(error.value), caplog.text, *capsys.readouterr(), *(str(w.message) for w in caught)]
    assert "cannot build the report of instance" in str(error.value)
    for value in [*SENTINELS.values(), "ZZSENTINELNAME", "ZZSENTBIRTH"]:
        for part in [value, *value.split("^")]:
            assert not any(part in text for text in texts), part


def test_the_writer_knows_its_own_captures_from_the_images_it_reports_on(written):
    """A heatmap capture is an image, so a PACS listing hands it to the batch: its metadata says it is ours."""
    data, _, objects, _ = written["12-bit"]
    capture, path = objects["capture"]
    assert sr.is_own_capture(metadata_of(path.read_bytes()))
    assert not sr.is_own_capture(metadata_of(data))
    capture_by_another = pydicom.dcmread(path)
    capture_by_another.Manufacturer = "another vendor"
    buffer = io.BytesIO()
    capture_by_another.save_as(buffer)
    assert not sr.is_own_capture(metadata_of(buffer.getvalue()))
