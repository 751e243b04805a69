"""The one prediction path (ChestXrayPredictor): probabilities, out-of-distribution checks and unreadable images."""

import base64
import json

import numpy as np
import pandas as pd
import pytest

from conftest import png, radiograph_like
from xray.monitoring import ood
from xray.serving import bundle, pyfunc
from xray.serving.predictor import OUTPUT_COLUMNS


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


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
