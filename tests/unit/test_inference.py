"""Batch inputs and the predictions table: what reaches the model, and one row per input image."""

import numpy as np
import pandas as pd
import pytest

from conftest import jpeg_bytes, write_zip
from xray import inference
from xray.errors import DatasetSourceError


def test_an_empty_folder_and_a_broken_zip_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetSourceError, match="no .jpeg, .jpg or .png images found at"):
        inference.gather(str(tmp_path / "empty"))
    (tmp_path / "batch.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DatasetSourceError, match="is not a readable zip archive"):
        inference.gather(str(tmp_path / "batch.zip"))
    with pytest.raises(DatasetSourceError, match="not a folder, zip, file or s3:// prefix"):
        inference.gather(str(tmp_path / "missing"))


def test_a_zip_of_images_is_read_in_name_order(tmp_path):
    archive = write_zip(
        tmp_path / "b.zip",
        {
            "x/b.jpeg": jpeg_bytes(1),
            "x/a.png": jpeg_bytes(2, fmt="PNG"),
            "x/notes.txt": b"ignored",
            "__MACOSX/x/._a.png": b"junk",
        },
    )
    names = [name for name, _ in inference.gather(str(archive))]
    assert names == [f"{archive}!x/a.png", f"{archive}!x/b.jpeg"]


def test_predictions_table_keeps_input_order_and_unreadable_rows(tmp_path):
    items = [("first.jpeg", jpeg_bytes(1)), ("broken.jpeg", b""), ("third.jpeg", jpeg_bytes(3))]
    images = inference.screen(items, tmp_path)
    rows = pd.DataFrame(
        {
            "probability": [0.2, 0.9],
            "label": ["NORMAL", "PNEUMONIA"],
            "threshold": 0.5,
            "ood_score": [0.1, 3.0],
            "status": ["ok", "out_of_distribution"],
            "reason": ["", "image content unlike the training images (content z 7.0)"],
        }
    )
    table = inference.predictions_table(images, rows, 0.5, "4")
    assert list(table.columns) == inference.PREDICTION_COLUMNS
    assert table["path"].tolist() == ["first.jpeg", "broken.jpeg", "third.jpeg"]
    assert table["status"].tolist() == ["ok", "unreadable", "out_of_distribution"]
    assert table["reason"][1] == "empty file (0 bytes)" and np.isnan(table["probability"][1])
    assert (
        table["probability"][2] == 0.9 and (table["threshold"] == 0.5).all() and (table["model_version"] == "4").all()
    )
