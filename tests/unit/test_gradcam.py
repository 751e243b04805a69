import io

import numpy as np
import pytest
from PIL import Image

from xray.config import ModelConfig
from xray.model import gradcam
from xray.model.network import build_model


@pytest.fixture(scope="module")
def model():
    built, _ = build_model(ModelConfig(image_size=64, dense_units=8), None)
    return built


def test_heatmap_matches_input_and_varies(model):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    maps = gradcam.heatmaps(model, images, threshold=0.5)
    assert maps.shape == (2, 64, 64)
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(m.std() > 0.01 for m in maps), "a heatmap is flat"


def test_overlay_png_is_not_blank(model):
    image = np.random.default_rng(1).uniform(0, 255, (64, 64, 3)).astype("float32")
    heat = gradcam.heatmaps(model, image[None], threshold=0.5)[0]
    picture = gradcam.overlay(image, heat)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    pixels = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    assert picture.size == (256, 256) and pixels.std() > 5


def test_confident_examples_pick_right_and_wrong_per_class():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.02, 0.9, 0.8, 0.99, 0.3])
    picks = gradcam.confident_examples(y, p, 0.5)
    assert [i for i, _ in picks] == [1, 2, 4, 5]
    assert "WRONG" in picks[1][1] and "right" in picks[0][1]
