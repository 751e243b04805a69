"""A real PACS (Orthanc with DICOMweb, started by the suite on loopback with its own storage): listing and reading
over QIDO-RS and WADO-RS, reports written back over STOW-RS, authentication, and the PACS failing mid-batch.

The batch here runs in-process on the tiny test predictor (conftest.predictor); the inference pipeline against the
PACS, end to end, is in tests/pipeline/test_local_stack.py.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.request
import zipfile
from collections import Counter

import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import MINI_ZIP, free_port
from dicom_factory import radiograph
from infra.pacs import Pacs, orthanc_binary
from xray.config.inference import InferenceConfig
from xray.errors import DatasetSourceError, SourceUnavailable
from xray.serving import batch, sr
from xray.serving.batch import PredictionWriter, predict_source
from xray.storage import dicomweb

pytestmark = pytest.mark.slow
PASSWORD = "SENTINEL-PACS-PASSWORD-5f1c"


def some_jpegs(count: int) -> list[bytes]:
    with zipfile.ZipFile(MINI_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("chest_xray/test/") and n.endswith(".jpeg"))
        return [archive.read(name) for name in names[:: max(len(names) // count, 1)][:count]]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, monkeypatch_module):
    try:
        orthanc_binary()
    except RuntimeError as error:
        pytest.fail(str(error))  # make test installs Orthanc (scripts/system_packages.sh): its absence is a failure
    server = Pacs(state=tmp_path_factory.mktemp("pacs"), port=free_port(), user="xray", password=PASSWORD)
    monkeypatch_module.setenv(dicomweb.USER_ENV, server.user)
    monkeypatch_module.setenv(dicomweb.PASSWORD_ENV, PASSWORD)
    server.up(die_with_parent=True)
    yield server
    server.down()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def stow_mix(pacs: Pacs, count: int = 9) -> dict:
    """Three studies of radiographs made from test JPEGs (one of them an adult's), a structured report and a CT;
    returns {sop_instance_uid: (what it is, its PatientID)}."""
    client = dicomweb.Client(dicomweb.parse(pacs.dicomweb))
    made = {}
    studies = [pydicom.uid.generate_uid() for _ in range(3)]
    for index, jpeg in enumerate(some_jpegs(count)):
        age = "045Y" if index == 4 else "003Y"
        data = radiograph(
            jpeg,
            bits=12,
            syntax=("explicit", "jpeg-ls", "rle")[index % 3],
            age=age,
            StudyInstanceUID=studies[index % 3],
            PatientID=f"P{index % 3}",
        )
        made[pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID] = (
            "adult" if index == 4 else "radiograph",
            f"P{index % 3}",
        )
        client.store([data])
    for name, kind in (("test-SR.dcm", "sr"), ("CT_small.dcm", "ct")):
        dataset = pydicom.dcmread(get_testdata_file(name))
        made[dataset.SOPInstanceUID] = (kind, str(dataset.get("PatientID", "")))
        buffer = io.BytesIO()
        dataset.save_as(buffer)
        client.store([buffer.getvalue()])
    return made


def reports_in(pacs: Pacs) -> list:
    """Every report this project wrote into the PACS, read back with pydicom."""
    client = dicomweb.Client(dicomweb.parse(pacs.dicomweb))
    found = []
    for study in client.search("/studies"):
        study_uid = dicomweb._value(study, "study")
        for item in client.search(f"/studies/{study_uid}/instances", {"Modality": "SR"}):
            data = client.retrieve(study_uid, dicomweb._value(item, "series"), dicomweb._value(item, "instance"))
            report = pydicom.dcmread(io.BytesIO(data))
            if report.get("Manufacturer") == "xray-pipeline":  # not the structured report stowed as an input
                found.append(report)
    return found


def test_unauthenticated_or_wrong_credentials_are_refused(pacs, monkeypatch):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{pacs.url}/dicom-web/studies", timeout=10)
    assert refused.value.code == 401
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, "wrong-password")
    with pytest.raises(DatasetSourceError) as error:
        list(dicomweb.Client(dicomweb.parse(pacs.dicomweb)).search("/studies"))
    message = str(error.value)
    assert "refused the credentials (HTTP 401)" in message and pacs.url in message and "wrong-password" not in message


def test_a_pacs_that_is_down_is_one_line():
    port = free_port()
    with pytest.raises(SourceUnavailable, match=rf"the PACS at http://127.0.0.1:{port}/dicom-web cannot be reached"):
        list(
            dicomweb.Client(dicomweb.parse(f"dicomweb://127.0.0.1:{port}/dicom-web"), max_attempts=2).search("/studies")
        )


def test_write_back_leaves_one_report_per_analysed_image_and_a_rerun_adds_none(pacs, predictor, tmp_path, caplog):
    made = stow_mix(pacs)
    writer_sr = sr.ReportWriter(pacs.dicomweb, "chest-xray-classifier", predictor.version)
    with PredictionWriter(str(tmp_path / "preds.csv")) as writer:
        result = predict_source(
            predictor,
            pacs.dicomweb,
            InferenceConfig(batch_size=4),
            writer,
            wanted=batch.Wanted(on_batch=writer_sr.write),
        )
    table = pd.read_csv(tmp_path / "preds.csv", keep_default_na=False)
    # The SR is listed and skipped (not an image, not a failure); the CT is read and out of scope.
    assert result.not_read == Counter({dicomweb.NOT_AN_IMAGE: 1}) and result.unreadable == 0
    assert len(table) == len(made) - 1 and set(table["sop_instance_uid"]) == set(made) - {
        uid for uid, (kind, _) in made.items() if kind == "sr"
    }
    by_uid = table.set_index("sop_instance_uid")
    assert by_uid.loc[[u for u, (k, _) in made.items() if k in ("adult", "ct")], "status"].eq("out_of_scope").all()
    assert table["path"].str.startswith(pacs.dicomweb + "/studies/").all()
    reports = reports_in(pacs)
    assert len(reports) == len(table) == writer_sr.written
    for report in reports:
        items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in report.ContentSequence}
        source = items["Source image"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        row = by_uid.loc[source]
        assert float(items["Probability of pneumonia"].MeasuredValueSequence[0].NumericValue) == pytest.approx(
            float(row["probability"]), abs=1e-6
        )
        assert items["Status"].TextValue == row["status"] and "Not a diagnosis" in items["Disclaimer"].TextValue
        assert report.StudyInstanceUID == row["study_instance_uid"] and report.Modality == "SR"
        assert report.SeriesInstanceUID != row["series_instance_uid"]  # a new series in the image's study
        assert report.PatientID == made[source][1]  # filed under the image's patient
    # Again: every report is found in the PACS, none written twice; the reports themselves are skipped as SRs.
    again = sr.ReportWriter(pacs.dicomweb, "chest-xray-classifier", predictor.version)
    result = predict_source(
        predictor, pacs.dicomweb, InferenceConfig(batch_size=4), None, wanted=batch.Wanted(on_batch=again.write)
    )
    assert again.written == 0 and again.already == len(table) and len(reports_in(pacs)) == len(reports)
    assert result.not_read[dicomweb.NOT_AN_IMAGE] == 1 + len(reports)
    assert PASSWORD not in caplog.text


def test_the_pacs_failing_mid_batch_stops_the_run_and_resume_finishes_it(pacs, predictor, tmp_path):
    source = pacs.dicomweb
    output = str(tmp_path / "preds.csv")
    endpoint = dicomweb.parse(source)
    total = sum(1 for _ in dicomweb.Client(endpoint).instances(Counter()))
    from xray.storage import listing

    refs = list(listing.list_images(source))

    def failing():
        for index, ref in enumerate(refs):
            if index == 5:
                pacs.down()
            yield ref

    from xray.serving.batch import predict_stream

    with pytest.raises(SourceUnavailable):
        with PredictionWriter(output) as writer:
            predict_stream(predictor, failing(), writer, batch_size=1, workers=1, window=1)
    kept = len(pd.read_csv(output))
    assert 0 < kept < total
    pacs.up(die_with_parent=True)
    with PredictionWriter(output, resume=True) as writer:
        result = predict_source(predictor, source, InferenceConfig(batch_size=4), writer)
    assert result.skipped == kept and len(pd.read_csv(output)) == total
