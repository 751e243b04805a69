"""prepare_dataset on synthetic archives: quarantine, conversion, duplicates and the bad-fraction gate."""

import pytest

from support import dataset_entries, jpeg_bytes
from xray.config.data import DataConfig
from xray.data.dataset import prepare_dataset
from xray.errors import DataQualityError


def test_bad_images_are_quarantined_and_listed(make_zip, tmp_path):
    entries = dataset_entries(per_class=40)
    good = jpeg_bytes(1000, size=64)
    entries |= {
        "chest_xray/train/NORMAL/IM-9001-0001.jpeg": b"",
        "chest_xray/train/NORMAL/IM-9002-0001.jpeg": b"not an image at all",
        "chest_xray/train/PNEUMONIA/person9003_virus_1.jpeg": good[: len(good) // 3],
        "chest_xray/train/PNEUMONIA/person9004_virus_1.jpeg": jpeg_bytes(9004, fmt="PNG"),
        "chest_xray/train/PNEUMONIA/person9005_virus_1.jpeg": jpeg_bytes(9005, mode="CMYK"),
        "chest_xray/train/NORMAL/IM-9006-0001.jpeg": jpeg_bytes(9006, mode="L"),
    }
    dataset, report = prepare_dataset(make_zip(entries), tmp_path / "d", DataConfig(max_bad_fraction=0.05), seed=0)
    reasons = {q["path"]: q["reason"] for q in report.quarantined}
    assert set(reasons) == {
        "train/NORMAL/IM-9001-0001.jpeg",
        "train/NORMAL/IM-9002-0001.jpeg",
        "train/PNEUMONIA/person9003_virus_1.jpeg",
    }
    assert reasons["train/NORMAL/IM-9001-0001.jpeg"] == "empty file (0 bytes)"
    assert report.converted == 1  # the CMYK JPEG; the PNG-named-.jpeg decodes as it is
    manifest = dataset.manifest.set_index("path")
    assert manifest.loc["train/PNEUMONIA/person9004_virus_1.jpeg", "format"] == "PNG"
    assert manifest.loc["train/PNEUMONIA/person9005_virus_1.jpeg.png", "channels"] == 4
    assert not any((dataset.root / p).exists() for p in reasons)


def test_too_many_bad_images_fail_the_run(make_zip, tmp_path):
    entries = dataset_entries(per_class=10) | {
        f"chest_xray/train/NORMAL/IM-{9000 + i}-0001.jpeg": b"bad" for i in range(3)
    }
    with pytest.raises(DataQualityError, match=r"3 of 43 images failed to decode \(7.0% > max_bad_fraction=1.0%\)"):
        prepare_dataset(make_zip(entries), tmp_path / "d", DataConfig(), seed=0)


def test_test_images_copied_into_train_are_removed_from_train(make_zip, tmp_path):
    entries = dataset_entries(per_class=10)
    leaked = entries["chest_xray/test/PNEUMONIA/person31_bacteria_1.jpeg"]
    entries["chest_xray/train/PNEUMONIA/person777_bacteria_1.jpeg"] = leaked
    dataset, report = prepare_dataset(make_zip(entries), tmp_path / "d", DataConfig(), seed=0)
    assert [r["path"] for r in report.duplicates_removed] == ["train/PNEUMONIA/person777_bacteria_1.jpeg"]
    assert report.duplicates_across_splits == 1
    assert "train/PNEUMONIA/person777_bacteria_1.jpeg" not in set(dataset.manifest["path"])
