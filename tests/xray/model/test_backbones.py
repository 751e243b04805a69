"""Every configurable backbone builds, predicts, explains and survives a Keras round trip."""

import numpy as np
import pytest

from xray.config.model import ModelConfig
from xray.model import gradcam
from xray.model.network import BACKBONES, build_model, set_backbone_trainable

SIZE = 64


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["per_image", "fixed"])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_backbone_predicts_and_explains(backbone, normalization, images):
    config = ModelConfig(backbone=backbone, image_size=SIZE, dense_units=4, input_normalization=normalization)
    model, _ = build_model(config, None)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (2, 1)
    assert np.all((probabilities > 0) & (probabilities < 1))
    maps = gradcam.heatmaps(model, images, threshold=0.5)
    assert maps.shape == (2, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["efficientnetv2b0", "mobilenetv3large"])
def test_backbone_round_trip_and_freezing(backbone, images, tmp_path):
    import keras

    model, base = build_model(ModelConfig(backbone=backbone, image_size=SIZE, dense_units=4), None)
    set_backbone_trainable(base, 0)
    assert not any(layer.trainable for layer in base.layers if layer.weights)
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ValueError, match="backbone"):
        ModelConfig(backbone="vgg16")
