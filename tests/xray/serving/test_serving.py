"""The one prediction path (ChestXrayPredictor): probabilities, out-of-distribution checks and unreadable images."""

import base64
import json

import numpy as np
import pandas as pd
import pytest

from support import png, radiograph_like
from xray.config.limits import DecodeLimits
from xray.monitoring import ood
from xray.serving import bundle, pyfunc
from xray.serving.predictor import OUTPUT_COLUMNS


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def grey():
    return radiograph_like(np.random.default_rng(11))


def grey_levels_96(image: np.ndarray) -> np.ndarray:
    return image[..., 0]


def radiograph_with_sentinels() -> bytes:
    from fixtures.dicom_factory import radiograph

    return radiograph(radiograph_like(np.random.default_rng(12))[..., 0], sentinels=True)


def test_rows_for_readable_ood_and_unreadable_images(predictor):
    rng = np.random.default_rng(1)
    normal, inverted = radiograph_like(rng), 255 - radiograph_like(rng)
    table = predictor.predict_bytes([png(normal), b"\xff\xd8\xff not a jpeg", png(inverted)])
    assert list(table.columns) == OUTPUT_COLUMNS
    assert table["status"].tolist()[1:] == [ood.UNREADABLE, ood.OUT_OF_DISTRIBUTION]
    assert table["status"][0] in (ood.OK, ood.OUT_OF_DISTRIBUTION)
    assert table["probability"][1] is None and table["ood_score"][1] is None and table["label"][1] == ""
    assert 0 < table["probability"][0] < 1 and table["label"][2] == ""  # out of distribution: no label
    assert table["ood_score"][2] > 1 and table["reason"][2]
    expected = predictor.model.predict(predictor.pixels(png(normal))[None], verbose=0)[0, 0]
    assert table["probability"][0] == pytest.approx(float(expected), abs=1e-6)


def test_a_request_with_nothing_readable_is_a_client_error(predictor):
    with pytest.raises(pyfunc.InvalidImage, match="image 0 cannot be decoded"):
        pyfunc.predict_request(predictor, {"inputs": [base64.b64encode(b"garbage").decode()]})
    with pytest.raises(pyfunc.InvalidImage, match="no images"):
        pyfunc.predict_request(predictor, {"inputs": []})
    with pytest.raises(pyfunc.InvalidImage, match="not base64"):
        pyfunc.predict_request(predictor, {"inputs": ["***"]})


def test_without_a_profile_nothing_is_scored_and_the_log_says_so(predictor, tmp_path, caplog):
    predictor.model.save(tmp_path / bundle.KERAS_FILE)
    (tmp_path / bundle.CONFIG_FILE).write_text(json.dumps({"threshold": 0.5, "image_size": 32, "version": "3"}))
    bare = bundle.read(str(tmp_path))
    assert bare.profile is None and "no reference profile" in caplog.text
    table = bare.predict_bytes([png(radiograph_like(np.random.default_rng(2)))])
    assert table["status"][0] == ood.OK and table["ood_score"][0] is None
    predictor.profile.save(tmp_path / bundle.PROFILE_DIR)
    assert bundle.read(str(tmp_path)).profile is not None


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"inputs": [[b64(b"a"), b64(b"b")]]}, "flat list"),
        ({"inputs": [7]}, "image 0 is a int"),
        ({"a": [b64(b"x")], "b": [b64(b"y")]}, "expected a list of images"),
        (pd.DataFrame({"a": ["x"], "b": ["y"]}), "one image column"),
        ({"inputs": ["x"] * (pyfunc.MAX_IMAGES_PER_REQUEST + 1)}, "over the limit of"),
        ({"inputs": ["A" * int(pyfunc.MAX_REQUEST_MB * 2**20 + 4)]}, "MB of image data in one request"),
    ],
)
def test_malformed_payloads_are_client_errors_that_say_what_to_send(predictor, payload, message):
    with pytest.raises(pyfunc.InvalidImage, match=message):
        pyfunc.predict_request(predictor, payload)


def test_the_compiled_call_equals_keras_predict_for_any_batch_size(predictor):
    rng = np.random.default_rng(0)
    for size in (1, 3, 8):
        batch = rng.uniform(0, 255, (size, 32, 32, 3)).astype("float32")
        expected = predictor.model.predict(batch, verbose=0).reshape(-1)
        np.testing.assert_allclose(predictor.probabilities(batch), expected, atol=1e-6)
    # Decoding inside the compiled call is the preprocessing of pixels(): the same numbers.
    images = [png(radiograph_like(rng)) for _ in range(3)]
    pixels = np.stack([predictor.pixels(data) for data in images])
    np.testing.assert_allclose(predictor.probabilities_of_encoded(images), predictor.probabilities(pixels), atol=1e-6)


def test_a_label_only_where_the_status_is_ok_and_every_answer_names_its_version(predictor):
    """A red square, an inverted radiograph and a file that is not an image: probability and score stay where there
    are some, the label is empty; a typical image keeps its label."""
    rng = np.random.default_rng(4)
    red = np.zeros((96, 96, 3), dtype=np.uint8)
    red[..., 0] = 220
    images = [png(radiograph_like(rng)), png(red), png(255 - radiograph_like(rng)), b"not an image"]
    table = predictor.predict_bytes(images)
    assert table["status"].tolist()[1:] == [ood.OUT_OF_DISTRIBUTION, ood.OUT_OF_DISTRIBUTION, ood.UNREADABLE]
    assert table["label"].tolist()[1:] == ["", "", ""]
    assert table["probability"][1] is not None and table["ood_score"][2] > 1
    ok = table["status"] == ood.OK
    assert ok.any() and table.loc[ok, "label"].isin(["NORMAL", "PNEUMONIA"]).all()
    assert (table["model_version"] == "7").all()
    served = pyfunc.predict_request(predictor, {"inputs": [base64.b64encode(data).decode() for data in images]})
    assert served["label"].tolist()[1:] == ["", "", ""] and (served["model_version"] == "7").all()


def sixteen_bit(grey: np.ndarray, fmt: str) -> bytes:
    """The full-range 16-bit export of an 8-bit grey image (level v -> 257 v, so 255 -> 65535)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_export_scores_as_its_8_bit_original(predictor, fmt):
    """The usual lossless export of a PACS: its grey levels scaled from the bit depth, not clipped at 255, for the
    model's input and the out-of-distribution checks alike."""
    rng = np.random.default_rng(5)
    greys = [radiograph_like(rng)[..., 0] for _ in range(8)]
    original = predictor.predict_bytes([png(grey) for grey in greys])
    exported = predictor.predict_bytes([sixteen_bit(grey, fmt) for grey in greys])
    np.testing.assert_allclose(exported["probability"].astype(float), original["probability"].astype(float), atol=0.02)
    np.testing.assert_allclose(exported["ood_score"].astype(float), original["ood_score"].astype(float), atol=1e-6)
    assert exported["status"].tolist() == original["status"].tolist()


# ---------------------------------------------------------------------------------------------------------------
# What a request may cost, and what an error may say


def grey_file(width: int, height: int, fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(width * height)
    rows = np.linspace(40, 220, height)[:, None] + rng.normal(0, 12, (height, width))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rows, 0, 255).astype(np.uint8)).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


@pytest.fixture
def limited(predictor):
    """The session's predictor under other decode limits for one test, then back to the defaults."""

    def use(**limits):
        predictor.use_limits(DecodeLimits(**limits))
        return predictor

    yield use
    predictor.use_limits(DecodeLimits())


def test_an_image_over_max_image_pixels_is_its_own_unreadable_row_naming_the_limit(limited, grey):
    from fixtures.dicom_factory import radiograph

    predictor = limited(max_image_pixels=9_000)
    table = predictor.predict_bytes([grey_file(120, 100), radiograph(grey_levels_96(grey)), grey_file(90, 90)])
    assert table["reason"][0] == "image too large: declares 120 x 100 x 1 pixels, over max_image_pixels 9000"
    assert table["reason"][1] == "DICOM too large: declares 96 x 96 x 1 pixels, over max_image_pixels 9000"
    assert table["status"].tolist()[:2] == [ood.UNREADABLE] * 2 and table["status"][2] != ood.UNREADABLE


def test_a_request_spends_its_pixels_image_by_image_and_the_rest_are_rows_that_say_so(limited):
    predictor = limited(max_image_pixels=10_000, max_decoding_pixels=10_000, max_request_pixels=25_000)
    table = predictor.predict_bytes([grey_file(100, 100)] * 4)
    assert table["status"].tolist()[2:] == [ood.UNREADABLE] * 2 and ood.UNREADABLE not in table["status"].tolist()[:2]
    assert table["reason"][2].startswith("over max_request_pixels: this request's images declare more than 25000")
    assert (predictor.predict_bytes([grey_file(100, 100)])["status"] != ood.UNREADABLE).all(), "per request"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_image_reaches_the_model_as_a_reduced_copy_that_scores_as_the_image(predictor, fmt):
    """4100 x 3000: decoded at a reduced scale (JPEG) or reduced after decoding (PNG), to 2048 px or less a side; the
    check keeps the original size, and the probability and the features are those of the image."""
    import io

    from PIL import Image

    from xray.data.images import REDUCED_SIDE, decode_image

    big = grey_file(4100, 3000, fmt)
    check, image = decode_image(big)
    assert (check.width, check.height) == (4100, 3000) and max(image.size) <= REDUCED_SIDE
    assert Image.open(io.BytesIO(check.converted)).size == image.size
    small = io.BytesIO()
    Image.open(io.BytesIO(big)).convert("L").resize((820, 600), Image.Resampling.BOX).save(small, format="PNG")
    both = predictor.predict_bytes([big, small.getvalue()])
    assert both["probability"][0] == pytest.approx(both["probability"][1], abs=0.01)
    assert predictor.prepare(big).features.width == 4100


def test_the_decoding_budget_makes_a_decode_wait_and_a_request_spend():
    import threading

    from xray.config.limits import PixelBudget

    budget, order = PixelBudget(10), []
    first_in, first_out = threading.Event(), threading.Event()

    def first():
        with budget.hold(8):
            first_in.set()
            first_out.wait()
            order.append("first done")

    def second():
        first_in.wait()
        with budget.hold(5):
            order.append("second decoding")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    first_in.wait()
    threads[1].join(0.2)
    assert threads[1].is_alive() and order == [], "5 more pixels do not fit beside 8 of 10"
    first_out.set()
    for thread in threads:
        thread.join()
    assert order == ["first done", "second decoding"] and budget.free == 10
    with budget.hold(50):  # larger than the whole budget: waits for all of it, then runs
        assert budget.free == 0
    assert budget.take(6) and not budget.take(6) and budget.take(4) and budget.free == 0


def test_limits_are_validated_and_serving_reads_them_from_its_variables(monkeypatch):
    with pytest.raises(ValueError, match="max_image_pixels must not exceed"):
        DecodeLimits(max_image_pixels=10, max_request_pixels=5)
    monkeypatch.setenv("XRAY_SERVING_MAX_IMAGE_PIXELS", "4000000")
    monkeypatch.setenv("XRAY_SERVING_MAX_NESTING", "8")
    limits = DecodeLimits.from_environment()
    assert (limits.max_image_pixels, limits.max_nesting) == (4_000_000, 8)
    assert limits.max_request_pixels == DecodeLimits().max_request_pixels


def test_one_failure_of_one_image_is_its_row_never_the_requests(predictor, monkeypatch):
    from xray.serving import predictor as predictor_module

    images = [png(radiograph_like(np.random.default_rng(i))) for i in range(3)]
    real = predictor_module.decode_image

    def fails_on_the_second(data, **kwargs):
        if data == images[1]:
            raise RecursionError("maximum recursion depth exceeded")
        return real(data, **kwargs)

    monkeypatch.setattr(predictor_module, "decode_image", fails_on_the_second)
    table = pyfunc.predict_request(predictor, {"inputs": [b64(data) for data in images]})
    assert (
        table["status"][1] == ood.UNREADABLE
        and table["reason"][1] == "cannot decode: nested too deeply (RecursionError)"
    )
    assert ood.UNREADABLE not in (table["status"][0], table["status"][2])


@pytest.fixture
def scoring_server(predictor, monkeypatch):
    """MLflow's scoring server's invocations with this project's guard, as `mlflow models serve` runs it (the real
    function, in this process); (invocations, a PyFuncModel of the session's predictor)."""
    from mlflow.models import Model
    from mlflow.pyfunc import PyFuncModel
    from mlflow.pyfunc import scoring_server as server

    monkeypatch.setattr(server, "invocations", server.invocations)  # undone after the test
    pyfunc.guard_scoring_server()
    return server.invocations, PyFuncModel(model_meta=Model(), model_impl=pyfunc._PyfuncModel(predictor))


def test_an_error_answers_with_its_reason_alone_never_the_payload_or_a_trace(scoring_server):
    from fixtures.dicom_factory import SENTINELS

    invocations, model = scoring_server
    truncated = radiograph_with_sentinels()[:-3000]
    payload = b64(truncated)
    cases = {
        "undecodable": json.dumps({"inputs": [payload]}),
        "not json": '{"inputs": ["' + payload[:4000],
        "not a request": json.dumps([payload]),
        "a bad shape": json.dumps({"inputs": {payload[:300]: payload}}),
    }
    for name, body in cases.items():
        answer = invocations(body, "application/json", model, None)
        text = answer.response
        assert answer.status == 400, (name, text)
        assert len(text) < 1000 and "Traceback" not in text and "stack_trace" not in text, (name, text)
        assert not any(payload[i : i + 40] in text for i in range(0, 4000, 20)), f"{name}: the payload came back"
        assert not any(value in text for value in SENTINELS.values())
    assert (
        "cannot decode DICOM pixel data" in invocations(cases["undecodable"], "application/json", model, None).response
    )


def test_a_request_with_one_hostile_image_answers_the_others(scoring_server, grey):
    from fixtures.dicom_factory import nested

    invocations, model = scoring_server
    images = [
        png(grey_levels_96(grey)),
        nested(grey_levels_96(grey), 400),
        png(radiograph_like(np.random.default_rng(9))),
    ]
    answer = invocations(json.dumps({"inputs": [b64(data) for data in images]}), "application/json", model, None)
    rows = json.loads(answer.response)["predictions"]
    assert answer.status == 200 and [row["status"] == ood.UNREADABLE for row in rows] == [False, True, False]
    assert rows[1]["reason"] == "DICOM nested too deeply: sequences within sequences past 16 levels"


def test_a_failure_that_is_not_the_requests_is_a_500_that_names_no_detail(scoring_server, monkeypatch, caplog):
    invocations, model = scoring_server
    monkeypatch.setattr(pyfunc, "predict_request", lambda *args: (_ for _ in ()).throw(KeyError("ZZSENTINELPID77")))
    answer = invocations(json.dumps({"inputs": [b64(b"x")]}), "application/json", model, None)
    assert answer.status == 500 and "ZZSENTINELPID77" not in answer.response + caplog.text
    assert json.loads(answer.response)["message"] == "the server failed to answer this request (KeyError)"


@pytest.mark.slow
def test_a_request_of_near_cap_images_stays_within_its_memory_bound(predictor):
    """64 JPEG-LS radiographs of 5000 x 5000 (25 M pixels, max_image_pixels, each; 2 KB each on the wire): the
    request decodes until max_request_pixels (8 of them) and answers the others as rows that say so. The process's
    peak RSS (VmHWM, reset before the request) grows by less than 1.5 GB, the bound of issue #40 (docs/BENCHMARKS.md,
    "Hostile inputs", has the measured numbers; 8 images of 10000 x 9999 took a serving worker 2.6 GB before)."""
    import gc

    from fixtures.dicom_factory import radiograph

    near_cap = radiograph(np.full((5000, 5000), 90, np.uint8), bits=12, syntax="jpeg-ls")
    request = {"inputs": [b64(near_cap)] * 64}
    gc.collect()

    def resident_kb(field: str) -> int:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")  # VmHWM back to the current RSS
    before = resident_kb("VmRSS")
    table = pyfunc.predict_request(predictor, request)
    grown_mb = (resident_kb("VmHWM") - before) / 1024
    assert (table["status"] != ood.UNREADABLE).sum() == 8
    assert table["reason"][8:].str.startswith("over max_request_pixels").all()
    assert grown_mb < 1536, f"a request of near-cap images grew the process by {grown_mb:.0f} MB"
