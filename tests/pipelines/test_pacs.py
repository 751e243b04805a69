"""A real PACS (Orthanc with DICOMweb, started by the suite on loopback with its own storage): listing and reading
over QIDO-RS and WADO-RS, reports and heatmaps written back over STOW-RS and read back by validators no one here
wrote (dciodvfy, dcmjs), authentication, and the PACS failing mid-batch.

The batch here runs in-process on the tiny test predictor (conftest.predictor); the inference pipeline against the
PACS, end to end, is in tests/pipelines/test_local_stack_serving.py.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter

import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from dicom_tools import dciodvfy_errors, dcmjs_reports
from fixtures.dicom_factory import SENTINELS, radiograph
from infra.pacs import Pacs, orthanc_binary
from support import MINI_ZIP, ROOT, free_port
from xray.config.inference import InferenceConfig
from xray.errors import DatasetSourceError, SourceUnavailable
from xray.serving import batch, sr
from xray.serving.batch import PredictionWriter, predict_source
from xray.storage import dicomweb

pytestmark = pytest.mark.slow
PASSWORD = "SENTINEL-PACS-PASSWORD-5f1c"
MODEL = "chest-xray-classifier"
SCREENSHOT = ROOT / "outputs" / "pacs" / "web_viewer.png"
"""Where the browser test leaves what a person sees (docs/pacs_web_viewer.png is a copy of one)."""


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
    """Three studies of radiographs made from test JPEGs (one of them an adult's; a sentinel in every identifying
    tag but PatientID), a structured report and a CT; returns {sop_instance_uid: (what it is, its PatientID)}."""
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
            sentinels=True,
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


def objects_in(pacs: Pacs) -> dict[str, list[tuple[pydicom.Dataset, bytes]]]:
    """Every object this project wrote into the PACS by modality (SR, SEG, OT), read back: (dataset, file bytes)."""
    client = dicomweb.Client(dicomweb.parse(pacs.dicomweb))
    found = {}
    for study in client.search():
        study_uid = dicomweb._value(study, "study")
        for item in client.search(study_uid):
            data = client.retrieve(study_uid, dicomweb._value(item, "series"), dicomweb._value(item, "instance"))
            dataset = pydicom.dcmread(io.BytesIO(data))
            if dataset.get("Manufacturer") == sr.MANUFACTURER:  # not the structured report stowed as an input
                found.setdefault(dataset.Modality, []).append((dataset, data))
    return found


def reports_in(pacs: Pacs) -> list:
    """Every report this project wrote into the PACS, read back with pydicom."""
    return [dataset for dataset, _ in objects_in(pacs).get("SR", [])]


def test_unauthenticated_or_wrong_credentials_are_refused(pacs, monkeypatch):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{pacs.url}/dicom-web/studies", timeout=10)
    assert refused.value.code == 401
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, "wrong-password")
    with pytest.raises(DatasetSourceError) as error:
        list(dicomweb.Client(dicomweb.parse(pacs.dicomweb)).search())
    message = str(error.value)
    assert "refused the credentials (HTTP 401)" in message and pacs.url in message and "wrong-password" not in message


def test_a_pacs_that_is_down_is_one_line():
    port = free_port()
    with pytest.raises(SourceUnavailable, match=rf"the PACS at http://127.0.0.1:{port}/dicom-web cannot be reached"):
        list(dicomweb.Client(dicomweb.parse(f"dicomweb://127.0.0.1:{port}/dicom-web"), max_attempts=2).search())


def test_write_back_leaves_one_report_per_analysed_image_its_heatmaps_and_a_rerun_adds_none(
    pacs, explainable_predictor, tmp_path, caplog
):
    """One report per analysed image and the Segmentation and Secondary Capture of each ok one, each in the image's
    study and passing dciodvfy as the PACS hands it back; dcmjs reads each report's probability and finding. Again:
    nothing stored (the captures, images themselves, are listed but never reported on). A new model version: a new
    series under a new device UID beside the old one. No identifying value of the sources in any log or row."""
    caplog.set_level(logging.DEBUG)
    made = stow_mix(pacs)
    predictor = explainable_predictor
    writer_sr = sr.ReportWriter(pacs.dicomweb, MODEL, predictor.version, heatmaps=True, predictor=predictor)
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
    ok = set(table.loc[table["status"] == "ok", "sop_instance_uid"])
    assert 0 < len(ok) < len(table)
    written = objects_in(pacs)
    assert len(written["SR"]) == len(table) == writer_sr.written
    assert len(written["SEG"]) == len(written["OT"]) == len(ok) == writer_sr.heatmaps_written
    folder = tmp_path / "from-the-pacs"
    folder.mkdir()
    paths = {}
    for modality, objects in written.items():
        for dataset, data in objects:
            paths[dataset.SOPInstanceUID] = folder / f"{modality}-{dataset.SOPInstanceUID}.dcm"
            paths[dataset.SOPInstanceUID].write_bytes(data)
    errors = {path.name: found for path in paths.values() if (found := dciodvfy_errors(path))}
    assert not errors, errors
    heatmaps = {
        dataset.SOPInstanceUID: dataset.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        if modality == "SEG"
        else dataset.SourceImageSequence[0]
        for modality in ("SEG", "OT")
        for dataset, _ in written[modality]
    }
    assert {ref.ReferencedSOPInstanceUID for ref in heatmaps.values()} == ok
    reports = [dataset for dataset, _ in written["SR"]]
    for report, read in zip(reports, dcmjs_reports([paths[r.SOPInstanceUID] for r in reports])):
        (group,) = read["groups"]
        source = group["sourceSOPInstanceUID"]
        row = by_uid.loc[source]
        assert (
            read["template"] == "1500"
            and read["deviceObserverUID"]
            == sr.identities(source, row["study_instance_uid"], MODEL, predictor.version).device
        )
        codes = {c["concept"]["value"]: c["value"]["meaning"] for c in group["codes"]}
        if source in ok:
            assert group["numbers"][0]["value"] == pytest.approx(float(row["probability"]), abs=1e-6)
            assert codes["233604007"] == ("Present" if row["label"] == "PNEUMONIA" else "Absent")
            referred = {image["sopInstanceUID"] for image in group["images"] if image["concept"]["value"] == "130401"}
            assert len(referred) == 2 and all(heatmaps[uid].ReferencedSOPInstanceUID == source for uid in referred)
        else:
            assert group["numbers"] == [] and "233604007" not in codes
            assert codes["XR-STATUS"] == sr.STATUSES[row["status"]].meaning
        assert report.StudyInstanceUID == row["study_instance_uid"] and report.Modality == "SR"
        assert report.SeriesInstanceUID != row["series_instance_uid"]  # a new series in the image's study
        assert report.PatientID == made[source][1]  # filed under the image's patient
    # Again: every object is found in the PACS, none written twice; the captures are listed, never reported on.
    again = sr.ReportWriter(pacs.dicomweb, MODEL, predictor.version, heatmaps=True, predictor=predictor)
    result = predict_source(
        predictor, pacs.dicomweb, InferenceConfig(batch_size=4), None, wanted=batch.Wanted(on_batch=again.write)
    )
    assert again.summary() == {
        "reports_written": 0,
        "reports_already_in_pacs": len(table),
        "reports_not_written_invalid_uid": 0,
        "heatmaps_written": 0,
        "heatmaps_already_in_pacs": len(ok),
        "own_captures_skipped": len(ok),
    }
    assert result.not_read[dicomweb.NOT_AN_IMAGE] == 1 + len(reports) + len(ok)  # the SRs and the segmentations
    assert {modality: len(objects) for modality, objects in objects_in(pacs).items()} == {
        modality: len(objects) for modality, objects in written.items()
    }
    # A new model version: its own report series and device, the old reports left in place.
    newer = sr.ReportWriter(pacs.dicomweb, MODEL, "8")
    predict_source(
        predictor, pacs.dicomweb, InferenceConfig(batch_size=4), None, wanted=batch.Wanted(on_batch=newer.write)
    )
    assert newer.written == len(table) and newer.own_captures == len(ok)
    after = reports_in(pacs)
    assert len(after) == 2 * len(table) and {r.SOPInstanceUID for r in reports} <= {r.SOPInstanceUID for r in after}
    new_series = {r.SeriesInstanceUID for r in after} - {r.SeriesInstanceUID for r in reports}
    assert len(new_series) == len({r.StudyInstanceUID for r in reports})
    assert PASSWORD not in caplog.text
    texts = [caplog.text, table.to_csv(), str(writer_sr.summary())]
    for value in SENTINELS.values():
        for part in [value, *value.split("^")]:
            assert not any(part in text for text in texts), f"{part} came out"


def test_the_web_viewer_shows_the_heatmap_capture_beside_its_source_image(pacs, explainable_predictor):
    """A study written back with heatmaps, opened as a person would: Orthanc's Web Viewer (Debian's plugin) on the
    source series and on the capture's series, side by side in headless Chromium; both pictures are drawn, the capture
    under its series description, and the page is kept as a screenshot."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the browser test needs Chromium and its driver: run make system-packages")
    study = pydicom.uid.generate_uid()
    jpeg = some_jpegs(3)[2]
    client = dicomweb.Client(dicomweb.parse(pacs.dicomweb))
    client.store([radiograph(jpeg, bits=12, StudyInstanceUID=study, PatientID="DEMO-1", SeriesDescription="Chest PA")])
    source = f"{pacs.dicomweb}?StudyInstanceUID={study}"
    writer = sr.ReportWriter(source, MODEL, "7", heatmaps=True, predictor=explainable_predictor)
    predict_source(explainable_predictor, source, InferenceConfig(), wanted=batch.Wanted(on_batch=writer.write))
    assert writer.written == writer.heatmaps_written == 1
    authorization = "Basic " + base64.b64encode(f"{pacs.user}:{PASSWORD}".encode()).decode()

    def orthanc(path: str, body: bytes | None = None):
        request = urllib.request.Request(pacs.url + path, data=body, headers={"Authorization": authorization})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)

    (found,) = orthanc("/tools/lookup", study.encode())
    series = {item["MainDicomTags"]["Modality"]: item["ID"] for item in orthanc(f"/studies/{found['ID']}/series")}
    assert set(series) == {"DX", "SR", "SEG", "OT"}
    deadline = time.monotonic() + 30
    while not all(orthanc(f"/series/{series[m]}")["IsStable"] for m in ("DX", "OT")) and time.monotonic() < deadline:
        time.sleep(0.5)  # the viewer waits for a stable series (StableAge, 2 s)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,950"):
        options.add_argument(argument)
    options.add_argument("--disable-gpu")
    browser = webdriver.Chrome(options=options, service=Service(driver))
    drawn = "const c = document.querySelector('#dicomImage canvas'); if (!c || !c.width) return 0; "
    drawn += "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let lit = 0; "
    drawn += (
        "for (let i = 0; i < d.length; i += 4) lit += d[i] + d[i + 1] + d[i + 2] > 60; return lit / (d.length / 4);"
    )
    texts, pictures = [], []
    try:
        # The PACS asks for basic authentication: the browser sends it with every request.
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": authorization}})
        for modality in ("DX", "OT"):
            browser.get(f"{pacs.url}/web-viewer/app/viewer.html?series={series[modality]}")
            try:
                WebDriverWait(browser, 90).until(lambda b: b.execute_script(drawn) > 0.2)
            finally:
                pictures.append(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))
            texts.append(browser.execute_script("return document.getElementById('topright').innerText"))
    finally:
        browser.quit()
        # The two viewer windows side by side, as a reader would arrange them.
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        side_by_side = Image.new(
            "RGB", (sum(p.width for p in pictures) or 1, max((p.height for p in pictures), default=1))
        )
        for index, picture in enumerate(pictures):
            side_by_side.paste(picture, (sum(p.width for p in pictures[:index]), 0))
        side_by_side.save(SCREENSHOT)
    assert "Chest PA" in texts[0] and f"AI heatmap image: {MODEL} v7" in texts[1]
    assert SCREENSHOT.stat().st_size > 50_000


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


def test_the_studies_are_their_owners_only_and_a_second_up_keeps_the_running_orthanc(pacs):
    """The storage holds patients' studies: the state folder 0700, every file Orthanc writes 0600 (umask 077), the
    config 0600 even where an older one was wider. A second `up` awaits the Orthanc that runs, never starts another."""
    import stat

    stow_mix(pacs, count=3)
    stored = [path for path in (pacs.state / "storage").rglob("*") if path.is_file()]
    assert stored and stat.S_IMODE(pacs.state.stat().st_mode) == 0o700
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in stored} == {oct(0o600)}
    assert stat.S_IMODE((pacs.state / "orthanc.json").stat().st_mode) == 0o600
    running = pacs.pid()
    assert pacs.up() is None and pacs.pid() == running and pacs.healthy()
