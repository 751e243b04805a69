import numpy as np
import pytest

from support import jpeg_bytes
from xray.data import inputs
from xray.data.images import decode_and_resize


def test_class_weights_balance_the_loss():
    labels = np.array([0] * 25 + [1] * 75, dtype=np.float32)
    weights = inputs.class_weights(labels)
    assert weights[0] * 25 == pytest.approx(weights[1] * 75)
    assert weights[0] == pytest.approx(2.0)


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("RGB", "PNG")])
def test_decode_and_resize_gives_three_channels(mode, fmt):
    image = decode_and_resize(jpeg_bytes(5, size=40, mode=mode, fmt=fmt), 24)
    assert tuple(image.shape) == (24, 24, 3) and image.dtype.name == "uint8"
    if mode == "L":
        pixels = image.numpy()
        assert np.array_equal(pixels[..., 0], pixels[..., 1])


def _batch(n=8, size=32):
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (n, size, size, 3)).astype("float32")


def test_augment_keeps_shape_and_range():
    from xray.config.train import Augmentation

    images = _batch()
    out = inputs.augment(
        images, Augmentation(horizontal_flip=True, zoom=0.2, rotation=0.05, contrast=0.2, brightness=0.1), 0
    )
    assert tuple(out.shape) == images.shape
    assert float(np.min(out)) >= 0 and float(np.max(out)) <= 255
    assert not np.allclose(out, images)


def test_flip_only_mirrors_or_keeps_each_image():
    from xray.config.train import Augmentation

    images = _batch(16)
    out = inputs.augment(images, Augmentation(horizontal_flip=True, zoom=0.0), 1).numpy()
    for original, result in zip(images, out):
        assert np.array_equal(result, original) or np.array_equal(result, original[:, ::-1])
    assert any(not np.array_equal(r, o) for r, o in zip(out, images))


def test_zoom_without_change_is_identity():
    from xray.config.train import Augmentation

    images = _batch()
    assert not Augmentation(horizontal_flip=False, zoom=0.0).enabled
    out = inputs._flip_zoom_rotate(images, 8, [32, 32], Augmentation(horizontal_flip=False, zoom=1e-9), 0)
    np.testing.assert_allclose(out, images, atol=1e-2)


def test_translation_shifts_each_image_within_its_range():
    from xray.config.train import Augmentation

    size, n = 41, 64
    images = np.zeros((n, size, size, 3), dtype="float32")
    images[:, 20, 20, :] = 255.0
    config = Augmentation(horizontal_flip=False, zoom=0.0, translation=0.2, interpolation="nearest")
    assert config.enabled
    out = inputs.augment(images, config, 3).numpy()
    shifts = []
    for image in out:
        rows, cols = np.nonzero(image[..., 0])
        assert len(rows) == 1  # nearest resampling moves the pixel whole
        shifts.append((rows[0] - 20, cols[0] - 20))
    shifts = np.array(shifts)
    assert np.abs(shifts).max() <= 0.2 * size + 1
    assert len({tuple(s) for s in shifts}) > 10  # shifts differ from image to image, in both axes
    assert shifts[:, 0].std() > 1 and shifts[:, 1].std() > 1


def test_stretch_changes_the_aspect_ratio_both_ways_within_its_range():
    from xray.config.train import Augmentation

    size, n, side, stretch = 63, 64, 21, 0.3
    images = np.zeros((n, size, size, 3), dtype="float32")
    images[:, 21:42, 21:42, :] = 255.0
    config = Augmentation(horizontal_flip=False, zoom=0.0, stretch=stretch, interpolation="nearest")
    assert config.enabled
    out = inputs.augment(images, config, 5).numpy()
    ratios = []
    for image in out:
        rows, cols = np.nonzero(image[..., 0])
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert side / (1 + stretch) - 1 <= min(height, width) and max(height, width) <= side / (1 - stretch) + 1
        ratios.append(width / height)
    ratios = np.array(ratios)
    assert (ratios < 0.9).any() and (ratios > 1.1).any()  # narrower in some images, wider in others
    assert ratios.min() >= (1 - stretch) / (1 + stretch) * 0.9 and ratios.max() <= (1 + stretch) / (1 - stretch) * 1.1


def test_mixup_blends_images_labels_and_class_weights_alike():
    labels = np.array([0, 1] * 16, dtype="float32")
    # Each image's pixels equal 255 x its label, so a consistent blend keeps image / 255 == label.
    images = np.broadcast_to(255.0 * labels[:, None, None, None], (32, 8, 8, 3)).astype("float32")
    mixed, soft, weights = (t.numpy() for t in inputs.mixup(images, labels, 0.4, {0: 2.0, 1: 0.5}, 0))
    np.testing.assert_allclose(mixed[:, 0, 0, 0] / 255.0, soft, atol=1e-5)
    np.testing.assert_allclose(mixed, mixed[:, :1, :1, :1] * np.ones_like(mixed), atol=1e-3)
    np.testing.assert_allclose(weights, 2.0 + (0.5 - 2.0) * soft, atol=1e-5)
    assert ((soft > 0.05) & (soft < 0.95)).sum() >= 4  # some pairs really mix two classes


def test_mixup_batches_carry_the_class_weights_and_train(tmp_path, monkeypatch):

    from support import jpeg_bytes, one_layer_model
    from xray.config.model import ModelConfig
    from xray.config.train import Augmentation, TrainConfig
    from xray.model import training

    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"{i}.jpeg"))
        (tmp_path / f"{i}.jpeg").write_bytes(jpeg_bytes(i))
    labels = np.array([0, 1] * 4, dtype="float32")
    spec = inputs.DatasetSpec(
        image_size=32,
        batch_size=4,
        augmentation=Augmentation(mixup=0.4),
        class_weights={0: 2.0, 1: 0.5},
        max_train_per_class=None,
        max_eval_per_class=None,
        seed=0,
        counts={"train": {"NORMAL": 4, "PNEUMONIA": 4}},
    )
    train = inputs.make_dataset(paths, labels, spec, training=True)
    val = inputs.make_dataset(paths, labels, spec)
    assert len(next(iter(train))) == 3 and len(next(iter(val))) == 2
    assert inputs.fit_class_weight(spec) is None
    assert inputs.fit_class_weight(spec.model_copy(update={"augmentation": Augmentation()})) == {0: 2.0, 1: 0.5}

    monkeypatch.setattr(training, "build_model", one_layer_model)  # the batches and fit are under test
    _, history, _ = training.fit(
        ModelConfig(image_size=32, dense_units=4), TrainConfig(epochs=1), spec, (train, val), log=lambda line: None
    )
    assert np.isfinite(history["loss"]).all() and "val_auc" in history


def test_cache_key_follows_domain_code(tmp_path, monkeypatch):
    from steps import caching

    for folder in ("xray", "materializers"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(caching, "ROOT", tmp_path)
    before = caching.domain_code_hash()
    (tmp_path / "xray" / "a.py").write_text("x = 2\n")
    assert caching.domain_code_hash() != before
