"""The real Kaggle images from ../shared: validation, splits and the input pipeline."""

import zipfile

import numpy as np
import pytest

from support import MINI_ZIP, require
from xray import CLASS_NAMES
from xray.config.data import DataConfig
from xray.config.train import Augmentation
from xray.data import inputs
from xray.data.dataset import prepare_dataset


def _check_invariants(dataset, report):
    manifest = dataset.manifest
    assert manifest["path"].is_unique
    assert set(manifest["split"]) == {"train", "val", "test"}
    train = set(manifest.loc[manifest.split == "train", "patient_id"])
    val = set(manifest.loc[manifest.split == "val", "patient_id"])
    assert not train & val, "a patient is in both train and val"
    assert not set(manifest.loc[manifest.split == "train", "sha256"]) & set(
        manifest.loc[manifest.split == "test", "sha256"]
    )
    assert all((dataset.root / p).is_file() for p in manifest["path"])
    assert report.counts == {
        s: {l: int(((manifest.split == s) & (manifest.label == l)).sum()) for l in CLASS_NAMES}
        for s in ("train", "val", "test")
    }


def test_mini_archive(tmp_path):
    dataset, report = prepare_dataset(require(MINI_ZIP), tmp_path / "d", DataConfig(), seed=42)
    _check_invariants(dataset, report)
    counts = report.counts
    removed = len(report.duplicates_removed) + len(report.quarantined)
    assert sum(counts["train"].values()) + sum(counts["val"].values()) + sum(counts["test"].values()) + removed == 241
    assert sum(counts["test"].values()) == 47 - sum(1 for q in report.quarantined if q["split"] == "test")
    assert "carved from train" in report.val_source
    assert counts["val"]["NORMAL"] >= 5 and counts["val"]["PNEUMONIA"] >= 5


def test_kaggle_layout_counts_each_image_once(tmp_path):
    """Nested duplicate copy, __MACOSX forks and an 8+8 val/, as in the real Kaggle download."""
    kaggle = tmp_path / "kaggle.zip"
    moved = {"NORMAL": 0, "PNEUMONIA": 0}
    with zipfile.ZipFile(require(MINI_ZIP)) as source, zipfile.ZipFile(kaggle, "w") as target:
        for info in source.infolist():
            if info.is_dir():
                continue
            data, name = source.read(info), info.filename
            parts = name.split("/")
            if len(parts) == 4 and parts[1] == "train" and parts[2] in moved and moved[parts[2]] < 8:
                moved[parts[2]] += 1
                name = "/".join([parts[0], "val", parts[2], parts[3]])
            target.writestr(name, data)
            target.writestr(name.replace("chest_xray/", "chest_xray/chest_xray/", 1), data)
            target.writestr("__MACOSX/" + name.rsplit("/", 1)[0] + "/._" + name.rsplit("/", 1)[1], b"\0\5\26\7fork")
    dataset, report = prepare_dataset(kaggle, tmp_path / "d", DataConfig(), seed=42)
    _check_invariants(dataset, report)
    total = sum(sum(c.values()) for c in report.counts.values())
    assert total + len(report.duplicates_removed) + len(report.quarantined) == 241
    assert report.ignored_entries == 241  # the nested copy
    assert report.junk_files == 241  # the __MACOSX forks
    assert "merged into train first" in report.val_source


@pytest.mark.slow
def test_full_archive_counts(full_dataset):
    dataset, report = full_dataset
    _check_invariants(dataset, report)
    counts = report.counts
    train_val = sum(counts["train"].values()) + sum(counts["val"].values())
    test = sum(counts["test"].values())
    removed_train_val = sum(1 for r in report.duplicates_removed if r["split"] in ("train", "val"))
    quarantined = {s: sum(1 for q in report.quarantined if q["split"] == s) for s in ("train", "test")}
    assert train_val == 5216 - removed_train_val - quarantined["train"]
    assert test == 624 - quarantined["test"]
    assert report.junk_files == 3  # the .DS_Store files
    assert report.patients_in_train_and_test > 0  # the dataset's known patient overlap is reported
    assert all(r["split"] != "test" for r in report.duplicates_removed)


def test_input_pipeline_on_real_images(tmp_path):
    dataset, _ = prepare_dataset(require(MINI_ZIP), tmp_path / "d", DataConfig(), seed=1)
    spec = inputs.make_spec(dataset.manifest, 64, 8, Augmentation(zoom=0.2), 4, None, 1)
    rows = inputs.select(dataset.manifest, "train", spec)
    assert len(rows) == 8 and spec.counts["train"] == {"NORMAL": 4, "PNEUMONIA": 4}
    images, labels = next(iter(inputs.make_dataset(dataset.paths(rows), inputs.labels_of(rows), spec, training=True)))
    assert images.shape == (8, 64, 64, 3) and images.dtype.name == "float32"
    assert 0 <= float(np.min(images)) and float(np.max(images)) <= 255
    plain = next(iter(inputs.make_dataset(dataset.paths(rows), None, spec)))[0]
    again = next(iter(inputs.make_dataset(dataset.paths(rows), None, spec)))[0]
    np.testing.assert_array_equal(plain, again)  # evaluation input is deterministic
