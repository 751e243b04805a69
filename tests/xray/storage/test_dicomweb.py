"""A PACS that misbehaves (tests/fake_pacs.py, in this process on 127.0.0.1): every read is bounded in bytes, pages,
studies and time, a UID enters a URL only when it is one, no redirect leaves the PACS, and a broken answer is one line
naming the URL. The real Orthanc is in tests/pipelines/test_pacs.py."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from fake_pacs import BOUNDARY, FakePacs, attribute, drip, json_answer
from fixtures.dicom_factory import radiograph
from xray.config.inference import InferenceConfig
from xray.config.limits import PacsLimits
from xray.errors import DatasetSourceError
from xray.serving.batch import PredictionWriter, predict_source
from xray.storage import dicomweb

IMAGE_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
STUDY, SERIES = "1.2.3.4", "1.2.3.4.1"


@pytest.fixture(scope="module")
def images() -> dict:
    """Three small radiographs in one study."""
    rng = np.random.default_rng(7)
    return {
        (STUDY, SERIES, f"{SERIES}.{i}"): radiograph(rng.integers(40, 200, (48, 48)).astype(np.uint8))
        for i in (1, 2, 3)
    }


def client(pacs: FakePacs, **limits) -> dicomweb.Client:
    return dicomweb.Client(dicomweb.parse(pacs.url), max_attempts=2, limits=PacsLimits(**limits))


def instances_answer(*uids: str):
    return json_answer(
        [
            attribute("0020000E", SERIES) | attribute("00080018", uid) | attribute("00080016", IMAGE_CLASS)
            for uid in uids
        ]
    )


def batch(predictor, pacs: FakePacs, tmp_path, **limits) -> pd.DataFrame:
    settings = InferenceConfig(pacs=PacsLimits(**limits))
    with PredictionWriter(str(tmp_path / "out.csv")) as writer:
        result = predict_source(predictor, pacs.url, settings, writer, max_attempts=2)
    return pd.read_csv(tmp_path / "out.csv", keep_default_na=False).assign(summary=[result.summary()] * writer.rows)


@pytest.mark.parametrize(
    "value, valid",
    [
        ("1.2.840.10008.5.1.4.1.1.1.1", True),
        ("0.1.2", True),
        ("2.25." + "9" * 59, True),
        ("2.25." + "9" * 60, False),  # 65 characters
        ("1.02.3", False),  # a leading zero
        ("1..2", False),
        ("1.2.", False),
        ("../../../../../etc/passwd", False),
        ("1.2.3?x=1#frag", False),
        ("1.2.3/..", False),
        (None, False),
        (123, False),
    ],
)
def test_a_uid_is_the_dicom_ui_grammar(value, valid):
    assert dicomweb.is_uid(value) is valid


def test_uids_that_are_not_uids_never_reach_a_url(images, predictor, tmp_path):
    pacs = FakePacs(images)
    pacs.override = lambda path, query: (
        instances_answer("../../../../../etc/passwd", "1.2.3?x=1#frag", f"{SERIES}.1", "1.02.3")
        if path.endswith(f"/studies/{STUDY}/instances")
        else None
    )
    with pacs.running():
        table = batch(predictor, pacs, tmp_path)
        with pytest.raises(DatasetSourceError, match="does not go into a PACS URL"):
            client(pacs).retrieve(STUDY, SERIES, "../../x")
    assert len(table) == 1 and table["summary"][0]["skipped"] == {dicomweb.INVALID_UID: 3}
    asked = [path for _, path in pacs.requests]
    assert not any(".." in path or "x=1" in path or "#" in path or "/etc/" in path for path in asked), asked


def test_a_redirect_off_the_pacs_is_not_followed_and_one_within_it_is(images, predictor, tmp_path):
    elsewhere = FakePacs({(STUDY, SERIES, f"{SERIES}.9"): next(iter(images.values()))})
    pacs = FakePacs(images)

    def redirect(path, query):
        if path.endswith(f"{SERIES}.1"):  # to the same image on another host
            return 302, {"Location": f"{elsewhere.http}/dicom-web/studies/{STUDY}/series/{SERIES}/instances/x"}, b""
        if path.endswith(f"{SERIES}.2"):  # within the PACS: followed
            return 307, {"Location": f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/{SERIES}.3"}, b""
        return None

    pacs.override = redirect
    with pacs.running(), elsewhere.running():
        table = batch(predictor, pacs, tmp_path)
        pacs.override = lambda path, query: (302, {"Location": f"{elsewhere.http}/dicom-web/studies"}, b"")
        with pytest.raises(
            DatasetSourceError, match=f"redirected .*/dicom-web/studies to {elsewhere.http}: not followed"
        ):
            list(client(pacs).search())
    assert not elsewhere.requests, "nothing reached the other host"
    unreadable = table[table["status"] == "unreadable"]
    assert len(table) == 3 and len(unreadable) == 1
    assert (
        unreadable["reason"].iloc[0].startswith("cannot be read: the PACS redirected")
        and "not followed" in (unreadable["reason"].iloc[0])
    )
    assert (table["status"] != "unreadable").sum() == 2  # the followed redirect answered with instance 3's bytes


def test_an_instance_over_its_byte_cap_is_its_own_row_and_is_not_read_to_the_end(images, predictor, tmp_path):
    sent = []

    def endless(path, query):
        if path.endswith(f"{SERIES}.2"):
            head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()

            def body():
                yield head
                for _ in range(1024):  # 1 GiB if read to the end
                    sent.append(1)
                    yield b"\0" * 2**20

            return 200, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}, body()
        if path.endswith(f"{SERIES}.3"):  # a length declared over the cap: refused before a byte of it is read
            return 200, {"Content-Type": "multipart/related; boundary=x", "Content-Length": str(2**31)}, iter([b""])
        return None

    pacs = FakePacs(images)
    pacs.override = endless
    with pacs.running():
        table = batch(predictor, pacs, tmp_path, max_instance_bytes=2**20)
    reasons = dict(zip(table["path"].str.rsplit("/", n=1).str[-1], table["reason"]))
    assert "with more than" in reasons[f"{SERIES}.2"] and "over the limit" in reasons[f"{SERIES}.2"]
    assert f"with {2**31} bytes, over the limit" in reasons[f"{SERIES}.3"]
    assert (table["status"] == "unreadable").sum() == 2 and table["summary"][0]["unreadable"] == 2
    assert len(sent) < 64, f"{len(sent)} MiB were sent for a 1 MiB cap: the body was read on"


def test_a_pacs_that_drips_is_cut_off_at_the_deadline(images):
    """One byte every 0.2 s: each read returns well inside the read timeout, so only an overall deadline ends it
    (without one, the drip would end after 60 s as an empty answer, and no error)."""
    pacs = FakePacs(images)
    pacs.override = lambda path, query: (200, {"Content-Type": "application/dicom+json"}, drip(b" ", 0.2, 300))
    with pacs.running(), pytest.raises(DatasetSourceError) as error:
        list(client(pacs, deadline_s=1).search())
    assert str(error.value) == (
        f"the PACS did not finish answering {pacs.http}/dicom-web/studies within 1 s (inference.pacs.deadline_s)"
    )


def test_a_query_that_fills_every_page_stops_at_max_pages_and_a_source_at_max_studies(images):
    def endless(path, query):
        offset = int(query.get("offset", 0))
        return json_answer([attribute("0020000D", f"1.2.{offset + i + 1}") for i in range(int(query["limit"]))])

    pacs = FakePacs(images)
    pacs.override = endless
    with pacs.running():
        with pytest.raises(DatasetSourceError, match=r"filled 3 pages of 100 results .*inference.pacs.max_pages"):
            list(client(pacs, max_pages=3).instances(Counter()))
        assert len(pacs.requests) == 3, "every study is listed before any instance is asked for"
        with pytest.raises(DatasetSourceError, match=r"more than 150 studies match .*inference.pacs.max_studies"):
            list(client(pacs, max_studies=150).instances(Counter()))


@pytest.mark.parametrize(
    "body, what",
    [
        (b'[{"0020000D": {"vr": "UI", "Value": ["1.2', "malformed JSON"),
        (b'{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}', "dict, not the DICOM JSON asked for"),
        (b'[null, {"0020000D": null}]', "a list holding something else, not the DICOM JSON asked for"),
        (b"[" * 100_000 + b"]" * 100_000, "malformed JSON"),
        (b"<html>a proxy's error page</html>", "malformed JSON"),
    ],
)
def test_an_answer_that_is_not_dicom_json_is_one_line_naming_the_url(images, body, what):
    pacs = FakePacs(images)
    pacs.override = lambda path, query: (200, {"Content-Type": "application/dicom+json"}, body)
    with pacs.running(), pytest.raises(DatasetSourceError) as error:
        list(client(pacs).search(filters={"PatientID": "ZZSENTINELPID77"}))
    assert str(error.value) == f"the PACS answered {pacs.http}/dicom-web/studies with {what}"


def test_odd_values_in_dicom_json_are_skipped_not_fatal(images):
    pacs = FakePacs(images)
    odd = [{"0020000D": {"vr": "UI", "Value": [7]}}, {"0020000D": {"Value": None}}, {"0020000D": "1.2"}, {}]
    pacs.override = lambda path, query: json_answer(odd) if path.endswith("/studies") else None
    skipped = Counter()
    with pacs.running():
        assert list(client(pacs).instances(skipped)) == []
    assert skipped == {dicomweb.INVALID_UID: 4}


def test_a_page_over_its_byte_cap_is_refused(images):
    pacs = FakePacs(images)
    pacs.override = lambda path, query: json_answer([attribute("0020000D", "1.2.3")] * 5000)
    with pacs.running(), pytest.raises(DatasetSourceError, match="with .* bytes, over the limit of 4096"):
        list(client(pacs, max_response_bytes=4096).search())


def test_a_well_behaved_pacs_is_read_whole(images, predictor, tmp_path):
    pacs = FakePacs(images)
    with pacs.running():
        table = batch(predictor, pacs, tmp_path)
    assert sorted(table["path"].str.rsplit("/", n=1).str[-1]) == sorted(uid for _, _, uid in images)
    assert (table["status"] != "unreadable").all()


def test_the_dicomweb_library_logs_neither_a_query_nor_the_credentials_nor_the_pacs_words(images, caplog, monkeypatch):
    """dicomweb-client logs each URL with its query at DEBUG and a PACS's Warning header: neither reaches the logs."""
    import logging

    monkeypatch.setenv(dicomweb.PASSWORD_ENV, "ZZSENTINELPASSWORD")
    caplog.set_level(logging.DEBUG)
    pacs = FakePacs(images)
    answer = (200, {"Content-Type": "application/dicom+json", "Warning": '299 pacs "ZZSENTINELWARNING"'}, b"[]")
    pacs.override = lambda path, query: answer
    with pacs.running():
        assert list(client(pacs).search(filters={"PatientName": "ZZSENTINEL^NAME"})) == []
    assert any("PatientName=ZZSENTINEL" in path for _, path in pacs.requests), "the filter went to the PACS"
    assert "ZZSENTINEL" not in caplog.text
