import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from xray.config.model import ModelConfig
from xray.model import gradcam
from xray.model.network import build_model
from xray.serving import explain


@pytest.fixture(scope="module")
def model():
    built, _ = build_model(ModelConfig(image_size=64, dense_units=8), None)
    return built


@pytest.mark.slow
def test_heatmap_matches_input_and_varies(model):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    maps = gradcam.heatmaps(model, images, threshold=0.5)
    assert maps.shape == (2, 64, 64)
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(m.std() > 0.01 for m in maps), "a heatmap is flat"


# A batch of two and a batch of one take different oneDNN kernels: 1.2e-5 apart on an AVX-512 EPYC (maps in [0, 1]).
SAME = 5e-4


@pytest.mark.slow
def test_a_heatmap_explains_the_class_it_is_asked_for(model):
    """Batch inference's row says which class was called (a site's operating point may differ from the version's):
    the map explains that class, whatever the threshold."""
    image = np.random.default_rng(2).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    both = gradcam.heatmaps(model, np.concatenate([image, image]), 0.5, towards_pneumonia=[True, False])
    assert np.allclose(both[0], gradcam.heatmaps(model, image, threshold=0.0)[0], atol=SAME)  # always PNEUMONIA
    assert np.allclose(both[1], gradcam.heatmaps(model, image, threshold=1.01)[0], atol=SAME)  # always NORMAL
    assert not np.allclose(both[0], both[1], atol=10 * SAME)


def test_a_captioned_overlay_keeps_the_aspect_and_fits_its_caption():
    picture = np.random.default_rng(3).uniform(0, 255, (3000, 2400)).astype(np.uint8)
    lines = ["NOT A DIAGNOSIS", "a longer second line that must fit the width of the picture " * 2]
    out = gradcam.captioned(picture, np.ones((32, 32)), lines, longest=1024, least_width=512)
    assert out.dtype == np.uint8 and out.shape[1] == 819 and out.shape[0] > 1024 and out.shape[2] == 3
    small = gradcam.captioned(picture[:60, :48], np.ones((32, 32)), lines, longest=1024, least_width=512)
    assert small.shape[1] == 512 and small.shape[0] > 640
    assert gradcam.stretched(np.eye(32), 300, 240).shape == (300, 240)


@pytest.mark.slow
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


def _rows(specs):
    """Prediction rows from (path, probability, status): threshold 0.5, label only where ok."""
    rows = []
    for index, (path, p, status) in enumerate(specs):
        label = ("PNEUMONIA" if p >= 0.5 else "NORMAL") if status == "ok" else ""
        rows.append(
            {"path": path, "sha256": f"{index:064x}", "probability": p, "label": label, "threshold": 0.5}
            | {"ood_score": 0.1, "status": status, "reason": "", "model_version": "3"}
        )
    return pd.DataFrame(rows)


def test_the_images_explained_are_the_most_confident_calls_and_those_nearest_the_threshold():
    """Not the first N files (in the case tried, all NORMAL): half the most confident PNEUMONIA calls, half the
    nearest calls to the threshold, each once, never an unreadable file or an out-of-distribution PNEUMONIA."""
    table = _rows(
        [
            ("a/NORMAL-1.jpeg", 0.02, "ok"),
            ("a/NORMAL-2.jpeg", 0.05, "ok"),
            ("b/p1.jpeg", 0.99, "ok"),
            ("b/p2.jpeg", 0.97, "ok"),
            ("b/p3.jpeg", 0.999, "out_of_distribution"),
            ("c/near-1.jpeg", 0.52, "ok"),
            ("c/near-2.jpeg", 0.47, "out_of_distribution"),
            ("c/far.jpeg", 0.2, "ok"),
            ("d/broken.jpeg", float("nan"), "unreadable"),
        ]
    )
    chosen = explain.choose_to_explain(table, 4)
    assert [(r["path"], r["why"]) for r in chosen] == [
        ("b/p1.jpeg", explain.MOST_CONFIDENT),
        ("b/p2.jpeg", explain.MOST_CONFIDENT),
        ("c/near-1.jpeg", explain.NEAREST),  # 0.02 from the threshold
        ("c/near-2.jpeg", explain.NEAREST),  # 0.03, out of distribution: still worth a look
    ]
    # One positive only: the nearest fill the rest; more than there are: every readable image once.
    assert [
        r["why"] for r in explain.choose_to_explain(table[~table["path"].isin(["b/p2.jpeg", "c/near-1.jpeg"])], 3)
    ] == [
        explain.MOST_CONFIDENT,
        explain.NEAREST,
        explain.NEAREST,
    ]
    everything = explain.choose_to_explain(table, 20)
    assert len(everything) == 8 and "d/broken.jpeg" not in {r["path"] for r in everything}


def test_the_candidates_kept_while_streaming_give_the_same_choice_as_the_whole_table():
    rng = np.random.default_rng(0)
    specs = [(f"x/{i}.png", float(p), "ok" if i % 7 else "out_of_distribution") for i, p in enumerate(rng.random(300))]
    table = _rows(specs)
    kept = pd.DataFrame(columns=table.columns)
    for start in range(0, 300, 32):  # batch by batch, as predict_stream does
        kept = explain.candidates_to_explain(pd.concat([kept, table.iloc[start : start + 32]], ignore_index=True), 5)
    assert len(kept) <= 10
    assert explain.choose_to_explain(kept, 5) == explain.choose_to_explain(table, 5)


@pytest.mark.slow
def test_explanations_are_named_per_input_and_captioned_with_a_colour_bar(model):
    same_name = [
        {"path": "/site/day1/image.jpeg", "sha256": "aa" * 32, "probability": 0.93, "threshold": 0.41}
        | {"label": "PNEUMONIA", "status": "ok", "why": explain.MOST_CONFIDENT},
        {"path": "/site/day2/image.jpeg", "sha256": "bb" * 32, "probability": 0.44, "threshold": 0.41}
        | {"label": "", "status": "out_of_distribution", "why": explain.NEAREST},
    ]
    names = [explain.explanation_name(rank, row) for rank, row in enumerate(same_name, 1)]
    assert len(set(names)) == 2 and all(name.startswith("gradcam_0") and "image" in name for name in names)
    caption = explain.explanation_caption(same_name[1])
    assert "P(PNEUMONIA) 0.440, threshold 0.410: out of distribution" in caption and explain.NEAREST in caption
    image = np.random.default_rng(1).uniform(0, 255, (64, 64, 3)).astype("uint8")
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="PNG")
    pictures = gradcam.explanations(model, [encoded.getvalue()], 64, 0.5, [caption])
    plain = gradcam.overlay(image.astype("float32"), gradcam.heatmaps(model, image[None].astype("float32"), 0.5)[0])
    assert len(pictures) == 1 and pictures[0].width > plain.width  # the colour bar beside the image
