"""Labelled sites: NORMAL/ and PNEUMONIA/ at any depth, through the training archive's checks."""

import zipfile

import pytest

from support import jpeg_bytes, write_zip
from xray.config.data import DataConfig
from xray.config.limits import ArchiveLimits
from xray.config.s3 import S3Config
from xray.data.inputs import labels_of
from xray.data.sites import load_site, site_name
from xray.errors import ArchiveError, DataQualityError, DatasetSourceError


def _entries(prefix: str = "export/2026/", per_class: int = 4, start: int = 0) -> dict[str, bytes]:
    entries = {}
    for offset, folder in enumerate(("NORMAL", "pneumonia")):
        for i in range(per_class):
            seed = start + 100 * offset + i
            entries[f"{prefix}{folder}/img{i}.jpeg"] = jpeg_bytes(seed)
    return entries


def test_zip_with_class_folders_at_depth_and_junk(tmp_path):
    entries = (
        _entries()
        | _entries("other/batch/", per_class=2, start=50)
        | {"__MACOSX/export/NORMAL/._img0.jpeg": b"junk", "export/.DS_Store": b"junk", "export/notes.txt": b"hello"}
    )
    archive = write_zip(tmp_path / "hospital b.zip", entries)
    dataset, report = load_site(str(archive), tmp_path / "work", DataConfig(), S3Config())
    assert report["counts"] == {"NORMAL": 6, "PNEUMONIA": 6} and report["images"] == 12
    assert report["ignored_files"] == 1 and report["junk_files"] == 2 and report["sha256"]
    assert set(dataset.manifest["split"]) == {"site"}
    assert labels_of(dataset.manifest).sum() == 6 and all(p.endswith(".jpeg") for p in dataset.paths(dataset.manifest))
    assert site_name(str(archive)) == "hospital-b"


def test_folder_site_same_as_zip_and_duplicates_counted_once(tmp_path):
    entries = _entries()
    entries["export/2026/NORMAL/copy.jpeg"] = entries["export/2026/NORMAL/img0.jpeg"]
    for name, data in entries.items():
        (tmp_path / "site" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "site" / name).write_bytes(data)
    dataset, report = load_site(str(tmp_path / "site"), tmp_path / "work", DataConfig(), S3Config())
    assert report["counts"] == {"NORMAL": 4, "PNEUMONIA": 4} and report["duplicates_removed"] == 1
    assert site_name(str(tmp_path / "site") + "/", "Hospital B / ward 3") == "Hospital-B-ward-3"


def test_a_site_without_both_classes_is_refused(tmp_path):
    archive = write_zip(tmp_path / "s.zip", {k: v for k, v in _entries().items() if "NORMAL" in k})
    with pytest.raises(ArchiveError, match="no images in a PNEUMONIA/ folder"):
        load_site(str(archive), tmp_path / "work", DataConfig(), S3Config())
    with pytest.raises(ArchiveError, match="no NORMAL/ or PNEUMONIA/"):
        load_site(
            str(write_zip(tmp_path / "t.zip", {"a/b.jpeg": jpeg_bytes(1)})), tmp_path / "w2", DataConfig(), S3Config()
        )


def test_unsafe_or_oversized_archives_are_refused_like_training_archives(tmp_path):
    unsafe = write_zip(tmp_path / "unsafe.zip", _entries() | {"../escape/NORMAL/x.jpeg": jpeg_bytes(9)})
    with pytest.raises(ArchiveError, match="unsafe"):
        load_site(str(unsafe), tmp_path / "w1", DataConfig(), S3Config())
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in _entries().items():
            archive.writestr(name, data)
        archive.writestr("x/NORMAL/zeros.jpeg", b"\0" * (3 * 1024 * 1024))
    with pytest.raises(ArchiveError, match="max_compression_ratio"):
        load_site(str(bomb), tmp_path / "w2", DataConfig(limits=ArchiveLimits(max_compression_ratio=10)), S3Config())


def test_too_many_unreadable_images_fail_the_bad_image_budget(tmp_path):
    entries = _entries() | {f"export/NORMAL/bad{i}.jpeg": b"\xff\xd8\xff broken" for i in range(3)}
    with pytest.raises(DataQualityError):
        load_site(
            str(write_zip(tmp_path / "s.zip", entries)), tmp_path / "w", DataConfig(max_bad_fraction=0.1), S3Config()
        )


def test_missing_site_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetSourceError, match="not found"):
        load_site(str(tmp_path / "nowhere.zip"), tmp_path / "w", DataConfig(), S3Config())


def test_the_site_table_of_the_model_card_comes_from_the_version_tags():
    from xray.registry.card import site_table

    assert "No site has been evaluated yet" in site_table({})
    tags = {
        "site.b.images": "55",
        "site.b.threshold": "0.2",
        "site.b.recalibrated.fraction": "0.3",
        "site.b.recalibrated.threshold": "0.6",
        "site.b.recalibrated.images": "38",
    }
    for prefix in ("site.b.", "site.b.recalibrated."):
        for name, value in (("auc", 0.93), ("sensitivity", 0.9), ("specificity", 0.5), ("accuracy", 0.7), ("ece", 0.2)):
            tags |= {
                f"{prefix}{name}": str(value),
                f"{prefix}{name}_ci_low": str(value - 0.05),
                f"{prefix}{name}_ci_high": str(value + 0.01),
            }
    table = site_table(tags | {"test_auc": "0.9"})
    assert (
        "| b | as registered | 55 | 0.2000 | 0.930 (0.880-0.940) | 0.900 (0.850-0.910) | 0.500 (0.450-0.510) |" in table
    )
    assert "| b | recalibrated on 30% | 38 | 0.6000 |" in table


def test_one_json_tag_per_site_gives_the_same_table_as_the_per_metric_tags_did():
    """A site evaluation writes one version tag, not 41, and the card's table reads it."""
    import json

    from xray.registry.card import site_table, site_tag

    metrics = {"images": 55, "threshold": 0.2, "brier": 0.1}
    for name, value in (("auc", 0.93), ("sensitivity", 0.9), ("specificity", 0.5), ("accuracy", 0.7), ("ece", 0.2)):
        metrics |= {name: value, f"{name}_ci_low": value - 0.05, f"{name}_ci_high": value + 0.01}
    recalibrated = {"fraction": 0.3, "meets_policy": False, "metrics": metrics | {"images": 38, "threshold": 0.6}}
    key, value = site_tag("b", metrics, "run-1", recalibrated)
    assert key == "site.b" and len(value) < 5000 and json.loads(value)["recalibrated"]["meets_policy"] is False
    table = site_table({key: value, "test_auc": "0.9"})
    assert (
        "| b | as registered | 55 | 0.2000 | 0.930 (0.880-0.940) | 0.900 (0.850-0.910) | 0.500 (0.450-0.510) |" in table
    )
    assert "| b | recalibrated on 30% | 38 | 0.6000 |" in table


def test_the_registry_description_is_the_card_or_its_main_sections_within_mlflows_limit():
    from xray.registry.card import description

    card = (
        "# Model card: m\n\nintro\n\n## Intended use\nuse\n\n## Model\n" + "x" * 6000 + "\n\n## Test metrics\n| a |\n"
    )
    short = description(card[:300], "models:/m/1/model_card.md")
    assert short == card[:300]
    long = description(card, "models:/m/1/model_card.md")
    assert len(long) <= 5000 and "## Intended use" in long and "## Test metrics" in long and "x" * 100 not in long
    assert long.endswith("(this description holds its main sections).") and "models:/m/1/model_card.md" in long
