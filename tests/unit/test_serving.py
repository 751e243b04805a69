"""The one prediction path (ChestXrayPredictor): probabilities, out-of-distribution checks and unreadable images."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from xray import ood, serving

from conftest import radiograph_like


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def predictor():
    import keras

    rng = np.random.default_rng(0)
    features = [ood.features_of_array(radiograph_like(rng)) for _ in range(80)]
    profile = ood.fit_profile(features[:50], features[50:], np.full(30, 0.4), 0.5)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255.0),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    return serving.ChestXrayPredictor(model, 0.5, 32, "7", profile)


def test_rows_for_readable_ood_and_unreadable_images(predictor):
    rng = np.random.default_rng(1)
    normal, inverted = radiograph_like(rng), 255 - radiograph_like(rng)
    table = predictor.predict_bytes([png(normal), b"\xff\xd8\xff not a jpeg", png(inverted)])
    assert list(table.columns) == serving.OUTPUT_COLUMNS
    assert table["status"].tolist()[1:] == [ood.UNREADABLE, ood.OUT_OF_DISTRIBUTION]
    assert table["status"][0] in (ood.OK, ood.OUT_OF_DISTRIBUTION)
    assert table["probability"][1] is None and table["ood_score"][1] is None and table["label"][1] == ""
    assert 0 < table["probability"][0] < 1 and table["label"][2] in ("NORMAL", "PNEUMONIA")
    assert table["ood_score"][2] > 1 and table["reason"][2]
    expected = predictor.model.predict(predictor.pixels(png(normal))[None], verbose=0)[0, 0]
    assert table["probability"][0] == pytest.approx(float(expected), abs=1e-6)


def test_a_request_with_nothing_readable_is_a_client_error(predictor):
    with pytest.raises(serving.InvalidImage, match="image 0 cannot be decoded"):
        predictor.predict({"inputs": [base64.b64encode(b"garbage").decode()]})
    with pytest.raises(serving.InvalidImage, match="no images"):
        predictor.predict({"inputs": []})
    with pytest.raises(serving.InvalidImage, match="not base64"):
        predictor.predict({"inputs": ["***"]})


def test_without_a_profile_nothing_is_scored_and_the_log_says_so(predictor, tmp_path, caplog):
    predictor.model.save(tmp_path / serving.KERAS_FILE)
    (tmp_path / serving.CONFIG_FILE).write_text(json.dumps({"threshold": 0.5, "image_size": 32, "version": "3"}))
    bare = serving.ChestXrayPredictor.from_dir(str(tmp_path))
    assert bare.profile is None and "no reference profile" in caplog.text
    table = bare.predict_bytes([png(radiograph_like(np.random.default_rng(2)))])
    assert table["status"][0] == ood.OK and table["ood_score"][0] is None
    predictor.profile.save(tmp_path / serving.PROFILE_DIR)
    assert serving.ChestXrayPredictor.from_dir(str(tmp_path)).profile is not None
