import numpy as np
import pytest

from xray.config.model import ModelConfig
from xray.config.train import TrainConfig
from xray.model.training import learning_rate_schedule


def test_constant_schedule_is_the_learning_rate():
    assert learning_rate_schedule(TrainConfig(learning_rate=0.01), 0.01, 1000, 100) == 0.01


def test_cosine_warms_up_then_decays_to_one_percent():
    schedule = learning_rate_schedule(TrainConfig(lr_schedule="cosine", warmup_epochs=1), 1e-3, 1000, 100)
    rates = [float(schedule(step)) for step in (0, 50, 100, 550, 999)]
    assert rates[0] == pytest.approx(1e-4)
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3)
    assert rates[2] > rates[3] > rates[4]
    assert rates[4] == pytest.approx(1e-5, rel=0.05)


def test_cosine_without_warmup_starts_at_the_peak():
    schedule = learning_rate_schedule(TrainConfig(lr_schedule="cosine"), 1e-3, 10, 5)
    assert float(schedule(0)) == pytest.approx(1e-3)


@pytest.mark.slow  # builds two full backbones
def test_per_image_normalization_ignores_exposure_and_contrast():
    from xray.model.network import build_model

    model, _ = build_model(
        ModelConfig(backbone="mobilenetv3large", image_size=32, dense_units=4, input_normalization="per_image"), None
    )
    rng = np.random.default_rng(0)
    image = rng.uniform(40, 200, (2, 32, 32, 3)).astype("float32")
    darker_flatter = 0.6 * image + 10.0
    preprocess = model.get_layer("preprocess")
    np.testing.assert_allclose(preprocess(image).numpy(), preprocess(darker_flatter).numpy(), atol=1e-3)
    np.testing.assert_allclose(model.predict(image, verbose=0), model.predict(darker_flatter, verbose=0), atol=1e-4)
    fixed, _ = build_model(ModelConfig(image_size=32, dense_units=4), None)
    assert not np.allclose(
        fixed.get_layer("preprocess")(image).numpy(), fixed.get_layer("preprocess")(darker_flatter).numpy()
    )


@pytest.mark.slow
def test_per_image_model_survives_a_keras_round_trip(tmp_path):
    import keras

    from xray.model.network import build_model

    model, _ = build_model(
        ModelConfig(backbone="mobilenetv3large", image_size=32, dense_units=4, input_normalization="per_image"), None
    )
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    image = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    assert type(loaded.get_layer("preprocess")).__name__ == "LayerNormalization"
    np.testing.assert_allclose(loaded.predict(image, verbose=0), model.predict(image, verbose=0), atol=1e-5)
