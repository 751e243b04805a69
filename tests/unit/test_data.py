import numpy as np
import pytest

from conftest import jpeg_bytes
from xray import data as xdata


def test_class_weights_balance_the_loss():
    labels = np.array([0] * 25 + [1] * 75, dtype=np.float32)
    weights = xdata.class_weights(labels)
    assert weights[0] * 25 == pytest.approx(weights[1] * 75)
    assert weights[0] == pytest.approx(2.0)


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("RGB", "PNG")])
def test_decode_and_resize_gives_three_channels(mode, fmt):
    image = xdata.decode_and_resize(jpeg_bytes(5, size=40, mode=mode, fmt=fmt), 24)
    assert tuple(image.shape) == (24, 24, 3) and image.dtype.name == "uint8"
    if mode == "L":
        pixels = image.numpy()
        assert np.array_equal(pixels[..., 0], pixels[..., 1])
