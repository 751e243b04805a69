"""Grad-CAM, in one place: where in the image the backbone's last conv block drove the decision (:func:`heatmaps`),
and every picture of it: the overlay, the captioned picture a PACS receives (:func:`captioned`), the explanations of a
batch's chosen predictions with their colour bar (:func:`explanations`), the evaluation's most confident examples
(:func:`examples_grid`). Which predictions a batch explains is serving's choice (``xray.serving.explain``)."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from xray import CLASS_NAMES
from xray.data.images import decode_and_resize
from xray.model.network import logit_model

_COMPILED: list = [None, None]
"""The last model Grad-CAM ran on and its compiled Grad-CAM: traced once (3 s for ResNet50V2 at 128 px), then 4-6x
faster per image than eager (docs/BENCHMARKS.md, "Write-back to a PACS"); one slot, so no other model is kept alive."""


def _compiled(model):
    import keras  # lazy: Keras imports TensorFlow, seconds
    import tensorflow as tf  # lazy: TensorFlow's import takes seconds

    if _COMPILED[0] is model:
        return _COMPILED[1]
    # The backbone's last feature map, whichever backbone: what the classifier head pools; and the head's logit,
    # calibrated when the model is (sigmoid(logit) is then the probability the threshold applies to).
    probe = keras.Model(model.inputs, [model.get_layer("pool").input, logit_model(model).output])
    size = tuple(model.inputs[0].shape[1:])

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, *size], tf.float32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([None], tf.bool),
            tf.TensorSpec([], tf.bool),
        ]
    )
    def maps(batch, threshold, towards, given):
        with tf.GradientTape() as tape:
            features, logit = probe(batch, training=False)
            logit = tf.cast(logit, tf.float32)[:, 0]
            score = tf.where(tf.where(given, towards, tf.sigmoid(logit) >= threshold), logit, -logit)
        gradients = tape.gradient(score, features)
        features, gradients = tf.cast(features, tf.float32), tf.cast(gradients, tf.float32)
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[..., None]
        return tf.image.resize(cam, size[:2], method="bilinear")[..., 0]

    _COMPILED[:] = [model, maps]
    return maps


def heatmaps(model, images: np.ndarray, threshold: float, towards_pneumonia=None) -> np.ndarray:
    """(N, H, W) maps in [0, 1] for the class each image is predicted as, at the model's input size.

    ``towards_pneumonia`` (one bool per image): the class each map explains, when the call was made elsewhere (a
    site's operating point, a row of batch inference); without it, the class the head predicts at ``threshold``.

    The score is the head's logit (pre-sigmoid), signed towards the predicted
    class: a confident prediction saturates the sigmoid, and the gradient of
    the probability itself would vanish and leave a blank map.
    """
    given = towards_pneumonia is not None
    towards = np.asarray(towards_pneumonia if given else np.zeros(len(images)), dtype=bool)
    cam = _compiled(model)(np.asarray(images, np.float32), np.float32(threshold), towards, given).numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, min_size: int = 256) -> Image.Image:
    """Blend a jet-coloured heatmap over the grayscale X-ray, enlarged to at least ``min_size`` for reading."""
    gray = np.asarray(image, dtype=np.float32).mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    colour = colormaps["jet"](heatmap)[..., :3] * 255.0
    blended = (1 - alpha) * gray + alpha * colour
    picture = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    if picture.width < min_size:
        picture = picture.resize((min_size, round(min_size * picture.height / picture.width)), Image.Resampling.BICUBIC)
    return picture


def stretched(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A heatmap at the model's input size onto ``rows`` x ``columns`` of the original image, bilinear, in [0, 1]:
    the model saw the whole image squeezed into its square input, so stretching the map back puts each value over
    the pixels it came from."""
    picture = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    return np.clip(np.asarray(picture.resize((columns, rows), Image.Resampling.BILINEAR)), 0.0, 1.0)


def captioned(picture: np.ndarray, heatmap: np.ndarray, lines: list[str], longest: int, least_width: int) -> np.ndarray:
    """An original image's grey pixels (any size) with its heatmap over them (:func:`overlay`), scaled to ``longest``
    pixels at most on its longest side and ``least_width`` at least across, and ``lines`` burned in on a black band
    above (the first in red), in a font as large as the widest line allows: RGB, uint8."""
    grey = Image.fromarray(np.asarray(picture, dtype=np.uint8)).convert("L")
    scale = min(longest / max(grey.size), max(1.0, least_width / grey.width))
    width, height = max(round(grey.width * scale), 1), max(round(grey.height * scale), 1)
    rgb = np.repeat(np.asarray(grey.resize((width, height), Image.Resampling.BILINEAR), np.float32)[..., None], 3, -1)
    blended = overlay(rgb, stretched(heatmap, height, width), min_size=0)
    size = max(10, width // 36)
    widest = max(ImageFont.load_default(size=size).getlength(line) for line in lines)
    size = max(8, min(size, int(size * (width - size) / widest)))
    font, step = ImageFont.load_default(size=size), round(size * 1.3)
    band = step * len(lines) + size // 2
    canvas = Image.new("RGB", (width, height + band), "black")
    canvas.paste(blended, (0, band))
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((size // 2, size // 4 + index * step), line, fill="yellow" if index else "red", font=font)
    return np.asarray(canvas)


def confident_examples(y: np.ndarray, p: np.ndarray, threshold: float) -> list[tuple[int, str]]:
    """Per true class, the most confident right and the most confident wrong prediction."""
    predicted = (p >= threshold).astype(int)
    confidence = np.where(predicted == 1, p, 1 - p)
    picks = []
    for label in (0, 1):
        for right in (True, False):
            mask = (y == label) & ((predicted == label) == right)
            if mask.any():
                index = int(np.flatnonzero(mask)[np.argmax(confidence[mask])])
                verdict = "right" if right else "WRONG"
                picks.append((index, f"true {CLASS_NAMES[label]}, {verdict}: p={p[index]:.3f}"))
    return picks


def pixels_of(encoded: list[bytes], image_size: int) -> np.ndarray:
    """The model's input for encoded images, through the preprocessing training used."""
    import tensorflow as tf  # lazy: TensorFlow's import takes seconds

    return np.stack([decode_and_resize(tf.constant(data), image_size).numpy() for data in encoded]).astype(np.float32)


def load_pixels(paths: list[str], image_size: int) -> np.ndarray:
    import tensorflow as tf  # lazy: TensorFlow's import takes seconds

    return np.stack([decode_and_resize(tf.io.read_file(path), image_size).numpy() for path in paths]).astype(np.float32)


def overlays_for(model, paths: list[str], image_size: int, threshold: float) -> list[Image.Image]:
    pixels = load_pixels(paths, image_size)
    return [overlay(image, heat) for image, heat in zip(pixels, heatmaps(model, pixels, threshold))]


def with_colour_bar(picture: np.ndarray) -> Image.Image:
    """``picture`` with the heatmap's scale beside it: the jet colours from 0 (bottom) to the image's peak (top)."""
    height = picture.shape[0]
    size = max(8, height // 40)
    font = ImageFont.load_default(size=size)
    strip = colormaps["jet"](np.linspace(1.0, 0.0, height))[:, None, :3].repeat(max(8, height // 25), axis=1)
    width = picture.shape[1] + strip.shape[1] + size * 4
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(Image.fromarray(np.asarray(picture, np.uint8)), (0, 0))
    left = picture.shape[1] + size // 2
    canvas.paste(Image.fromarray((strip * 255).astype(np.uint8)), (left, 0))
    draw = ImageDraw.Draw(canvas)
    right = left + strip.shape[1] + 2
    draw.text((right, 0), "peak", fill="black", font=font)
    draw.text((right, height - size - 2), "0", fill="black", font=font)
    return canvas


def explanations(model, encoded: list[bytes], image_size: int, threshold: float, captions: list[str]) -> list:
    """Grad-CAM of the predicted class for each encoded image (the bytes the model decodes), each drawn as the PACS's
    capture is (:func:`captioned`: the caption's lines burned in above) with its colour bar beside it."""
    pixels = pixels_of(encoded, image_size)
    return [
        with_colour_bar(captioned(image, heat, caption.splitlines(), longest=512, least_width=384))
        for image, heat, caption in zip(pixels, heatmaps(model, pixels, threshold), captions)
    ]


def examples_grid(model, paths: list[str], y: np.ndarray, p: np.ndarray, threshold: float, image_size: int):
    """Grad-CAM of the most confident right and wrong predictions per true class (:func:`confident_examples`), side
    by side, each with its title burned in: one image."""
    picks = confident_examples(y, p, threshold)
    pixels = load_pixels([paths[i] for i, _ in picks], image_size)
    tiles = [
        captioned(image, heat, [title], longest=256, least_width=256)
        for image, heat, (_, title) in zip(pixels, heatmaps(model, pixels, threshold), picks)
    ]
    if not tiles:
        return Image.new("RGB", (256, 64), "black")
    height = max(tile.shape[0] for tile in tiles)
    canvas = Image.new("RGB", (sum(tile.shape[1] for tile in tiles) + 4 * (len(tiles) - 1), height), "white")
    left = 0
    for tile in tiles:
        canvas.paste(Image.fromarray(tile), (left, 0))
        left += tile.shape[1] + 4
    return canvas
