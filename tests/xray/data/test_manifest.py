import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from support import jpeg_bytes
from xray.data.images import check_image
from xray.data.manifest import (
    COLUMNS,
    carve_val,
    check_bad_fraction,
    needs_val_split,
    patient_id,
    remove_cross_split_duplicates,
)
from xray.errors import DataQualityError


@pytest.mark.parametrize(
    "name, expected",
    [
        ("person1003_bacteria_2934.jpeg", "person1003"),
        ("person25_virus_59.jpeg", "person25"),
        ("IM-0115-0001.jpeg", "im-0115"),
        ("NORMAL2-IM-0246-0001-0002.jpeg", "normal2-im-0246"),
        ("scan_001.jpeg", None),
    ],
)
def test_patient_id(name, expected):
    assert patient_id(name) == expected


def test_check_image_decodes_by_content():
    png_named_jpeg = jpeg_bytes(1, fmt="PNG")
    assert check_image(png_named_jpeg).ok and check_image(png_named_jpeg).format == "PNG"
    assert not check_image(b"").ok
    assert not check_image(b"garbage bytes that are no image").ok
    truncated = jpeg_bytes(2, size=64)[:300]
    assert not check_image(truncated).ok


@pytest.mark.parametrize(
    "mode, fmt, converted",
    [
        ("L", "JPEG", False),
        ("RGB", "JPEG", False),
        ("RGBA", "PNG", False),
        ("CMYK", "JPEG", True),
        ("RGB", "BMP", True),
    ],
)
def test_every_mode_reaches_three_channels(mode, fmt, converted):
    check = check_image(jpeg_bytes(3, mode=mode, fmt=fmt))
    assert check.ok
    assert (check.converted is not None) == converted
    if converted:
        assert Image.open(io.BytesIO(check.converted)).mode == "RGB"


def _rows(spec):
    rows = []
    for i, (split, label, patient, digest) in enumerate(spec):
        rows.append(
            {
                "path": f"{split}/{label}/{i}.jpeg",
                "split": split,
                "label": label,
                "patient_id": patient,
                "sha256": digest,
                "width": 8,
                "height": 8,
                "channels": 3,
                "format": "JPEG",
                "source_split": split,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def test_cross_split_duplicates_leave_train_not_test():
    manifest = _rows(
        [
            ("train", "NORMAL", "a", "h1"),
            ("test", "NORMAL", "b", "h1"),
            ("train", "NORMAL", "c", "h2"),
            ("train", "NORMAL", "d", "h2"),
            ("val", "PNEUMONIA", "e", "h3"),
            ("test", "PNEUMONIA", "f", "h3"),
        ]
    )
    kept, removed, within, across = remove_cross_split_duplicates(manifest)
    assert {(r["split"], r["sha256"]) for r in removed} == {("train", "h1"), ("val", "h3")}
    assert within == 1 and across == 2
    assert set(kept.loc[kept["sha256"] == "h1", "split"]) == {"test"}


def test_carved_val_is_grouped_by_patient_and_stratified():
    rng = np.random.default_rng(0)
    spec = []
    for label in ("NORMAL", "PNEUMONIA"):
        for patient in range(60):
            for _ in range(rng.integers(1, 5)):
                spec.append(("train", label, f"{label}:{patient}", f"{label}{patient}{len(spec)}"))
    spec += [("val", "NORMAL", "NORMAL:999", "v1"), ("test", "PNEUMONIA", "PNEUMONIA:3", "t1")]
    manifest = carve_val(_rows(spec), 0.2, seed=1)
    train, val = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "val"]
    assert not set(train["patient_id"]) & set(val["patient_id"])
    for label in ("NORMAL", "PNEUMONIA"):
        share = (val["label"] == label).sum() / (manifest[manifest["split"] != "test"]["label"] == label).sum()
        assert 0.15 <= share <= 0.3
    assert (manifest["split"] == "test").sum() == 1  # test untouched even when its patient is in train
    again = carve_val(_rows(spec), 0.2, seed=1)
    assert again.equals(manifest)


def test_needs_val_split():
    small = _rows([("val", "NORMAL", "a", "1"), ("val", "PNEUMONIA", "b", "2")])
    assert needs_val_split(small, 1) is False
    assert needs_val_split(small, 2) is True


def test_bad_fraction_gate():
    bad = [{"path": "x.jpeg", "reason": "cannot decode"}]
    check_bad_fraction(100, bad, 0.01)
    with pytest.raises(DataQualityError, match="max_bad_fraction"):
        check_bad_fraction(99, bad * 2, 0.01)
