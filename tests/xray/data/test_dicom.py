"""DICOM radiographs (xray.data.dicom, the scope checks, the prediction rows): the display pipeline for every
encoding, the wrong inputs, the header's scope and the patient data that must never come out."""

import base64
import io
import logging
import zlib

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from fixtures.dicom_factory import SENTINELS, SYNTAXES, grey_levels, nested, radiograph, with_sentinels
from support import png, radiograph_like
from xray.config.data import DataConfig
from xray.config.inference import InferenceConfig
from xray.config.limits import DecodeLimits
from xray.config.scope import ScopeConfig
from xray.data import dicom
from xray.data.dataset import prepare_dataset
from xray.data.images import decode_image
from xray.monitoring import ood, scope
from xray.monitoring.scope import OUT_OF_SCOPE
from xray.serving import pyfunc
from xray.serving.batch import PredictionWriter, predict_source

LOSSY = {"jpeg-baseline", "jpeg-ls-near", "jpeg2000"}


@pytest.fixture(scope="module")
def grey():
    return radiograph_like(np.random.default_rng(11))[..., 0]


def displayed(data: bytes) -> np.ndarray:
    header, pixels = dicom.read(data)
    return pixels


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_every_encoding_displays_the_grey_levels_it_was_made_from(grey, syntax, bits):
    if syntax == "jpeg-baseline" and bits != 8:
        pytest.skip("JPEG baseline holds 8 bits")
    data = radiograph(grey, bits=bits, syntax=syntax)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == SYNTAXES[syntax]
    difference = np.abs(displayed(data).astype(int) - grey)
    if syntax in LOSSY:  # the encoder's own loss, on a noisy picture: a grey level or two on average
        assert difference.mean() < 3 and difference.max() <= 16
    else:
        assert difference.max() == 0


@pytest.mark.parametrize(
    "options",
    [
        {"voi": "window"},  # the first of two windows: the second would wash the image out
        {"voi": "window-exact"},
        {"voi": "lut"},
        {"voi": "lut", "bits": 16},
        {"voi": "none", "bits": 16},
        {"photometric": "MONOCHROME1"},
        {"photometric": "MONOCHROME1", "voi": "lut", "syntax": "jpeg-ls"},
        {"rescale": (2, -1024)},
        {"rescale": (4, -1000), "voi": "lut", "bits": 16},
    ],
)
def test_the_modality_and_voi_luts_and_monochrome1_are_applied(grey, options):
    assert np.array_equal(displayed(radiograph(grey, **{"bits": 12, **options})), grey)


def test_a_sigmoid_window_follows_the_standard_formula(grey):
    shown = displayed(radiograph(grey, bits=12, voi="sigmoid"))
    values = grey.astype(float) * 16 + 8
    expected = np.round(255 / (1 + np.exp(-4 * (values - 2048) / 4096)))
    assert np.abs(shown.astype(int) - expected).max() <= 1


def test_bits_above_bits_stored_are_ignored(grey):
    """12 bits stored in 16 allocated, with the unused high bits set (overlay planes, garbage): the same picture."""
    clean = radiograph(grey, bits=12)
    dataset = pydicom.dcmread(io.BytesIO(clean))
    stored = dataset.pixel_array.astype(np.uint16)
    dataset.PixelData = (stored | 0xA000).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    assert np.array_equal(displayed(buffer.getvalue()), displayed(clean))


def test_a_colour_dicom_comes_back_as_rgb():
    check, image = decode_image(open(get_testdata_file("SC_rgb_small_odd.dcm"), "rb").read())
    assert check.ok and image.mode == "RGB" and check.format == "DICOM" and check.converted
    assert check.header.modality == "OT"


def _saved(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def _multi_frame(grey) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(radiograph(grey, bits=8)))
    dataset.NumberOfFrames = 2
    dataset.PixelData = dataset.PixelData * 2
    return _saved(dataset)


def _declares(grey, rows: int, columns: int) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(radiograph(grey, bits=8)))
    dataset.Rows, dataset.Columns = rows, columns
    return _saved(dataset)


def _deflate_bomb() -> bytes:
    """A Deflated Explicit VR file of a few MB that inflates to 2 GiB."""
    head = radiograph(np.zeros((8, 8), np.uint8), bits=8, syntax="deflated")
    dataset = pydicom.dcmread(io.BytesIO(head))
    meta = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(meta, dataset.file_meta)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    # A full flush leaves no back-reference into the block: repeated 128 times it inflates to 128 x 16 MiB, and only
    # one block is compressed (0.1 s against 9 s for 2 GiB). A fresh compressor's flush is the closing empty block.
    block = compressor.compress(b"\0" * 2**24) + compressor.flush(zlib.Z_FULL_FLUSH)
    body = block * 128 + zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()
    return b"\0" * 128 + b"DICM" + meta.getvalue() + body


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda g: _multi_frame(g), "multi-frame DICOM: 2 frames"),
        (lambda g: open(get_testdata_file("examples_palette.dcm"), "rb").read(), "unsupported DICOM colour palette"),
        (lambda g: open(get_testdata_file("test-SR.dcm"), "rb").read(), "DICOM without pixel data: not an image ("),
        (lambda g: radiograph(g, bits=12)[:-5000], "cannot decode DICOM pixel data"),
        (lambda g: radiograph(g, bits=12, syntax="jpeg-ls")[:2000], "cannot decode DICOM"),
        (lambda g: radiograph(g, bits=12)[:400], "cannot decode DICOM: an image without pixel data (truncated?)"),
        (lambda g: _declares(g, 60000, 60000), "DICOM too large: declares 60000 x 60000 x 1 pixels"),
        (lambda g: _deflate_bomb(), "cannot decode DICOM: the deflated dataset inflates past"),
        (lambda g: b"\0" * 128 + b"DICM" + zip_bytes(), "DICOM"),
        (lambda g: radiograph(g, bits=12, WindowWidth="0"), "invalid DICOM window"),
    ],
    ids=[
        "multi-frame",
        "palette",
        "sr",
        "truncated-pixels",
        "truncated-jpeg-ls",
        "truncated-header",
        "huge",
        "bomb",
        "zip",
        "window",
    ],
)
def test_what_is_not_one_radiograph_frame_is_unreadable_with_the_reason(grey, make, reason):
    check, image = decode_image(make(grey))
    assert not check.ok and image is None and check.reason.startswith(reason), check.reason


@pytest.mark.parametrize("syntax", ["explicit", "implicit", "deflated"])
@pytest.mark.parametrize("defined", [False, True], ids=["undefined-lengths", "defined-lengths"])
def test_sequences_nested_past_the_limit_are_unreadable_before_pydicom_reads_them(grey, syntax, defined):
    """pydicom reads a sequence by recursion: 200 nested sequences (a few KB) raised RecursionError out of the
    decoder, and a thousand defined-length ones held it for minutes. The nesting is measured first, without
    recursion, in every encoding; the limit is max_nesting (16), configurable."""
    limit = DecodeLimits().max_nesting
    assert decode_image(nested(grey, limit, defined=defined, syntax=syntax))[0].ok
    for depth in (limit + 1, 400):
        check, image = decode_image(nested(grey, depth, defined=defined, syntax=syntax))
        assert not check.ok and image is None
        assert check.reason == f"DICOM nested too deeply: sequences within sequences past {limit} levels"
    deeper = DecodeLimits(max_nesting=limit + 8)
    assert decode_image(nested(grey, limit + 8, defined=defined, syntax=syntax), limits=deeper)[0].ok


def test_the_nesting_of_real_files_is_measured_as_pydicom_reads_it():
    """pydicom's own test files, every encoding they hold: the depth measured before reading is at least the depth
    pydicom finds (it may count a private sequence pydicom leaves unread), and none is refused."""
    import warnings
    from pathlib import Path

    from xray.data import images

    def depth(dataset, level=0):
        inner = [depth(item, level + 1) for e in dataset if e.VR == "SQ" for item in e.value]
        return max(inner, default=level)

    compared = 0
    for path in sorted(Path(pydicom.data.__file__).parent.joinpath("test_files").rglob("*")):  # no downloads
        data = path.read_bytes() if path.is_file() else b""
        if not dicom.is_dicom(data):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                found = depth(pydicom.dcmread(io.BytesIO(data)))
            except Exception:  # noqa: BLE001 - files pydicom's tests keep broken on purpose
                continue
        syntax, start = images._dicom_meta(data)
        if syntax == images.DEFLATED:
            data, start = zlib.decompress(data[start:], -zlib.MAX_WBITS), 0
        measured = images._nesting(data, start, ">" if syntax == images.BIG_ENDIAN else "<")
        assert measured >= found, path.name
        compared += 1
    assert compared > 50


def zip_bytes() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.dcm", b"x" * 1000)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Scope


@pytest.mark.parametrize(
    "tags, reason",
    [
        ({"age": "045Y"}, "PatientAge 045Y outside the validated 1-5 years"),
        ({"age": "006M"}, "PatientAge 006M outside the validated 1-5 years"),
        ({"age": "092Y"}, "PatientAge over 89Y outside the validated 1-5 years"),
        ({"view": "LL"}, "ViewPosition LL outside the validated PA, AP"),
        ({"view": "LATERAL"}, "ViewPosition LATERAL outside the validated PA, AP"),
        ({"modality": "CT"}, "Modality CT outside the validated CR, DX"),
        ({"body_part": "HAND"}, "BodyPartExamined HAND outside the validated CHEST"),
        ({"age": None, "PatientBirthDate": "19800101"}, "age 46 years (StudyDate - PatientBirthDate) outside"),
    ],
)
def test_the_header_puts_an_image_out_of_scope_with_the_tag_and_value(grey, tags, reason):
    check, _ = decode_image(radiograph(grey, **tags))
    result = scope.check(check.header, ScopeConfig())
    assert not result.in_scope and result.reason.startswith(reason), result.reason


@pytest.mark.parametrize("age", ["001Y", "005Y", "066M", "060M", "012M"])
def test_children_of_the_validated_ages_are_in_scope(grey, age):
    check, _ = decode_image(radiograph(grey, age=age, view="AP", modality="CR"))
    assert scope.check(check.header, ScopeConfig()).in_scope


def test_a_missing_tag_is_recorded_unless_the_scope_requires_it(grey):
    check, _ = decode_image(radiograph(grey, age=None, view=None, body_part=None))
    lenient = scope.check(check.header, ScopeConfig())
    assert lenient.in_scope and lenient.unchecked == ["BodyPartExamined", "ViewPosition", "PatientAge"]
    strict = scope.check(check.header, ScopeConfig(required=("ViewPosition", "PatientAge")))
    assert strict.reasons == [
        "ViewPosition missing, and the scope requires it",
        "PatientAge missing, and the scope requires it",
    ]
    assert scope.check(None, ScopeConfig(required=("PatientAge",))).in_scope  # a JPEG has no header to check


def test_the_scope_is_configurable_and_validated():
    adults = ScopeConfig(age_years=(18, 120), views=("pa",))
    assert adults.views == ("PA",)
    with pytest.raises(ValueError, match="unknown tag"):
        ScopeConfig(required=("PatientWeight",))
    with pytest.raises(ValueError, match="youngest"):
        ScopeConfig(age_years=(5, 1))


def test_out_of_scope_rows_keep_probability_and_score_but_get_no_label(predictor, grey):
    images = [
        png(grey),
        radiograph(grey),
        radiograph(grey, age="045Y"),
        radiograph(grey, view="LL", bits=16, syntax="rle"),
        open(get_testdata_file("CT_small.dcm"), "rb").read(),
        open(get_testdata_file("MR_small.dcm"), "rb").read(),
        radiograph(grey, bits=12)[:600],
    ]
    table = predictor.predict_bytes(images)
    assert table["status"].tolist()[2:] == [OUT_OF_SCOPE] * 4 + [ood.UNREADABLE]
    assert table.loc[2, "reason"] == "PatientAge 045Y outside the validated 1-5 years"
    assert table.loc[4, "reason"].startswith("Modality CT outside the validated CR, DX")
    assert table.loc[5, "reason"].startswith("Modality MR outside")
    assert (table.loc[2:5, "label"] == "").all() and table.loc[2:5, "probability"].notna().all()
    assert table.loc[2:5, "ood_score"].notna().all()  # the pixel checks ran on every readable image too
    # A DICOM made from the PNG's pixels scores as that PNG does; only DICOM rows carry UIDs.
    assert table.loc[1, "probability"] == pytest.approx(table.loc[0, "probability"], abs=0.02)
    assert table.loc[0, "sop_instance_uid"] == "" and table.loc[1, "sop_instance_uid"].startswith("1.2.")
    assert table.loc[1, "status"] == table.loc[0, "status"] and table.loc[1, "label"] == table.loc[0, "label"]


# ---------------------------------------------------------------------------------------------------------------
# Patient data


def test_patient_hashes_are_keyed(monkeypatch):
    monkeypatch.setenv(dicom.PATIENT_KEY_ENV, "site-secret-a")
    a = dicom.patient_hash("12345")
    assert a == dicom.patient_hash("12345") and "12345" not in a and len(a) == 32
    monkeypatch.setenv(dicom.PATIENT_KEY_ENV, "site-secret-b")
    assert dicom.patient_hash("12345") != a


def test_without_a_site_key_the_fetch_threads_share_one_process_key_said_once(monkeypatch, caplog):
    """Eight fetch threads decode DICOM at once: they get one key (else one patient's images get several hashes in one
    run) and the missing XRAY_PATIENT_KEY is said once, not once per thread."""
    import threading
    import time

    monkeypatch.delenv(dicom.PATIENT_KEY_ENV, raising=False)
    monkeypatch.setattr(dicom, "_process_key", None)
    real = dicom.secrets.token_bytes
    monkeypatch.setattr(dicom.secrets, "token_bytes", lambda n: time.sleep(0.05) or real(n))  # a key slow to make
    start, keys = threading.Barrier(8), []
    caplog.set_level(logging.INFO, logger=dicom.__name__)

    def fetch():
        start.wait()
        keys.append(dicom.patient_key())

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert caplog.text.count(f"{dicom.PATIENT_KEY_ENV} is not set") == 1


def test_redact_removes_every_identifying_value_and_name_part(grey):
    dataset = pydicom.dcmread(io.BytesIO(radiograph(grey, sentinels=True)))
    text = " ".join(SENTINELS.values()) + " ZZSENTINELGIVEN alone"
    cleaned = dicom.redact(text, dataset)
    assert not any(value in cleaned for value in SENTINELS.values()) and "ZZSENTINELGIVEN" not in cleaned


def test_no_identifying_value_reaches_rows_logs_or_messages(predictor, grey, tmp_path, caplog, capsys, monkeypatch):
    """Sentinels in every identifying tag of good, out-of-scope and broken files (one whose broken value is a
    sentinel): every row of CSV and Parquet output, every answer and error, and every log line is searched."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(dicom.PATIENT_KEY_ENV, "test-site-key")
    # A value that breaks the window, and is a sentinel: written as a valid number, then overwritten in the bytes.
    placeholder = "123456789012345"
    assert len(placeholder) == len(SENTINELS["PatientID"])
    broken_window = radiograph(grey, sentinels=True, WindowCenter=placeholder).replace(
        placeholder.encode(), SENTINELS["PatientID"].encode()
    )
    files = {
        "good.dcm": radiograph(grey, sentinels=True),
        "adult": radiograph(grey, sentinels=True, age="045Y", syntax="jpeg-ls"),
        "truncated.dcm": radiograph(grey, sentinels=True)[:-3000],
        "broken-window.dcm": broken_window,
        "sr.dcm": with_sentinels(get_testdata_file("test-SR.dcm")),
        "ct.dcm": with_sentinels(get_testdata_file("CT_small.dcm")),
        "nested.dcm": nested(grey, 400),
    }
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    outputs = []
    for suffix in (".csv", ".parquet"):
        with PredictionWriter(str(tmp_path / f"out{suffix}")) as writer:
            result = predict_source(predictor, str(folder), InferenceConfig(), writer)
        outputs.append((tmp_path / f"out{suffix}").read_bytes())
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert len(table) == 7 and result.summary()["images"] == 7
    answers = pyfunc.predict_request(predictor, {"inputs": [base64.b64encode(d).decode() for d in files.values()]})
    with pytest.raises(pyfunc.InvalidImage) as refused:
        pyfunc.predict_request(predictor, {"inputs": [base64.b64encode(files["truncated.dcm"]).decode()]})
    captured = capsys.readouterr()
    texts = [table.to_csv(), answers.to_json(), str(refused.value), caplog.text, captured.out, captured.err]
    blobs = [text.encode() for text in texts] + outputs
    for value in SENTINELS.values():
        for part in [value, *value.split("^")]:
            assert not any(part.encode() in blob for blob in blobs), f"{part} came out"


# ---------------------------------------------------------------------------------------------------------------
# Serving and training


def test_serving_takes_base64_dicom_beside_jpeg_and_refuses_hostile_files_with_a_400(predictor, grey):
    from mlflow.exceptions import MlflowException

    model = pyfunc._PyfuncModel(predictor)
    good = [png(grey), radiograph(grey), radiograph(grey, syntax="jpeg2000-lossless", preamble=True)]
    answer = model.predict({"inputs": [base64.b64encode(d).decode() for d in good]})
    assert answer["sop_instance_uid"].tolist()[0] == "" and all(answer["sop_instance_uid"][1:])
    assert answer["probability"][1] == pytest.approx(answer["probability"][0], abs=0.02)
    for hostile in (radiograph(grey)[:1000], _declares(grey, 65535, 65535), b"\0" * 128 + b"DICM" + zip_bytes()):
        with pytest.raises(MlflowException) as error:
            model.predict({"inputs": [base64.b64encode(hostile).decode()]})
        assert error.value.get_http_status_code() == 400 and "cannot be decoded" in error.value.message
        # The worker goes on: the next request is answered.
        assert model.predict({"inputs": [base64.b64encode(good[1]).decode()]})["status"][0] != ood.UNREADABLE


def test_a_training_archive_may_hold_dicom_in_place_of_jpeg(make_zip, tmp_path, monkeypatch):
    """DICOM files (some without an extension) in train/ and test/: decoded once, stored as the PNG the model
    reads, grouped by the keyed PatientID hash (two images of one patient stay together)."""
    monkeypatch.setenv(dicom.PATIENT_KEY_ENV, "archive-key")
    rng = np.random.default_rng(3)
    entries = {}
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            for index in range(4):
                name = f"chest_xray/{split}/{label}/{split}{label}{index}" + (".dcm" if index % 2 else "")
                patient = f"PID-{split}-{label}-{index // 2}"
                entries[name] = radiograph(radiograph_like(rng)[..., 0], PatientID=patient, bits=12)
    dataset, report = prepare_dataset(make_zip(entries), tmp_path / "d", DataConfig(min_val_per_class=1), 0)
    manifest = dataset.manifest
    assert len(manifest) == 16 and (manifest["format"] == "DICOM").all() and report.converted == 16
    assert manifest["path"].str.endswith(".png").all()
    assert all((dataset.root / path).is_file() for path in manifest["path"])
    assert manifest["patient_id"].str.startswith("dicom:").all() and manifest["patient_id"].nunique() == 8
    assert not any("PID-" in value for value in manifest.to_csv(index=False).splitlines())
    check, image = decode_image((dataset.root / manifest["path"][0]).read_bytes())
    assert check.format == "PNG" and image.mode == "L"
    assert grey_levels(np.asarray(image)).shape == (96, 96)
