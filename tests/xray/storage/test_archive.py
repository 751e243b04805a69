import stat
import zipfile

import pytest

from support import dataset_entries, jpeg_bytes
from xray.config.limits import ArchiveLimits
from xray.errors import ArchiveError
from xray.storage.archive import extract, find_split_root, is_junk

LIMITS = ArchiveLimits()


def test_extracts_each_image_once_from_kaggle_layout(make_zip, tmp_path):
    entries = dataset_entries("chest_xray", splits=("train", "test", "val"))
    entries |= {k.replace("chest_xray/", "chest_xray/chest_xray/", 1): v for k, v in entries.items()}
    entries |= {
        "__MACOSX/chest_xray/train/NORMAL/._IM-0001-0001.jpeg": b"\0\5\26\7",
        "chest_xray/.DS_Store": b"junk",
        "chest_xray/train/.DS_Store": b"junk",
    }
    result = extract(make_zip(entries), tmp_path / "out", LIMITS)
    assert result.root == "chest_xray"
    assert len(result.files) == 18  # 3 per class x 2 classes x 3 splits, nested copy ignored
    assert result.junk == 3
    assert result.ignored == 18
    assert {split for split, _, _ in result.files} == {"train", "test", "val"}
    assert sorted(p.relative_to(tmp_path / "out").parts[0] for p in (tmp_path / "out").rglob("*.jpeg")) == sorted(
        split for split, _, _ in result.files
    )


def test_archive_without_top_folder(make_zip, tmp_path):
    entries = {k.removeprefix("chest_xray/"): v for k, v in dataset_entries().items()}
    assert extract(make_zip(entries), tmp_path / "out", LIMITS).root == "."


@pytest.mark.parametrize(
    "name, message",
    [
        ("/etc/evil.jpeg", "absolute path"),
        ("chest_xray/../../evil.jpeg", "path traversal"),
        ("C:/evil.jpeg", "absolute path"),
    ],
)
def test_unsafe_entries_are_rejected_by_name(make_zip, tmp_path, name, message):
    archive = make_zip(dataset_entries() | {name: b"x"})
    with pytest.raises(ArchiveError, match=message) as error:
        extract(archive, tmp_path / "out", LIMITS)
    assert name in str(error.value)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path.parent / "evil.jpeg").exists()


def test_symlink_entry_is_rejected(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in dataset_entries().items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("chest_xray/train/NORMAL/link.jpeg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ArchiveError, match="symlink entry 'chest_xray/train/NORMAL/link.jpeg'"):
        extract(path, tmp_path / "out", LIMITS)


def test_zip_bomb_entry_stops_while_streaming(tmp_path):
    """A 512 MiB run of zeros deflates to ~0.5 MiB; extraction must stop long before 512 MiB is written."""
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in dataset_entries().items():
            archive.writestr(name, data)
        with archive.open("chest_xray/train/NORMAL/IM-9999-0001.jpeg", "w", force_zip64=True) as entry:
            block = b"\0" * (1 << 20)
            for _ in range(512):
                entry.write(block)
    assert path.stat().st_size < 5 * 2**20
    limits = ArchiveLimits(max_entry_bytes=2 * 1024**3)  # header sizes alone would let it through
    with pytest.raises(ArchiveError, match="max_compression_ratio"):
        extract(path, tmp_path / "out", limits)
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written < 200 * 2**20


def test_total_and_count_limits(make_zip, tmp_path):
    archive = make_zip(dataset_entries())
    with pytest.raises(ArchiveError, match="max_entries=5"):
        extract(archive, tmp_path / "a", ArchiveLimits(max_entries=5))
    with pytest.raises(ArchiveError, match="max_total_bytes"):
        extract(archive, tmp_path / "b", ArchiveLimits(max_total_bytes=2000))


def test_not_a_zip_empty_zip_and_truncated_zip(tmp_path, make_zip):
    text = tmp_path / "notes.zip"
    text.write_text("this is not a zip")
    with pytest.raises(ArchiveError, match="not a readable zip"):
        extract(text, tmp_path / "o1", LIMITS)
    empty = make_zip({})
    with pytest.raises(ArchiveError, match="empty zip"):
        extract(empty, tmp_path / "o2", LIMITS)
    zero = tmp_path / "zero.zip"
    zero.write_bytes(b"")
    with pytest.raises(ArchiveError, match="empty"):
        extract(zero, tmp_path / "o3", LIMITS)
    whole = make_zip(dataset_entries(per_class=20))
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="truncated|not a readable zip"):
        extract(truncated, tmp_path / "o4", LIMITS)


def test_layout_errors_list_what_was_found(make_zip, tmp_path):
    only_train = {k: v for k, v in dataset_entries().items() if "/test/" not in k}
    with pytest.raises(ArchiveError, match="found splits: chest_xray/train"):
        extract(make_zip(only_train), tmp_path / "a", LIMITS)
    unknown = dataset_entries() | {"chest_xray/train/COVID/x.jpeg": jpeg_bytes(99)}
    with pytest.raises(ArchiveError, match=r"unknown class folder\(s\) \['COVID'\]"):
        extract(make_zip(unknown), tmp_path / "b", LIMITS)
    no_normal_test = {k: v for k, v in dataset_entries().items() if "test/NORMAL" not in k}
    no_normal_test["chest_xray/test/NORMAL/.DS_Store"] = b"junk"
    with pytest.raises(ArchiveError, match="class NORMAL has no images in split 'test'"):
        extract(make_zip(no_normal_test), tmp_path / "c", LIMITS)


def test_junk_detection():
    assert is_junk("__MACOSX/chest_xray/x.jpeg")
    assert is_junk("chest_xray/train/NORMAL/._x.jpeg")
    assert is_junk("a/Thumbs.db")
    assert not is_junk("chest_xray/train/NORMAL/x.jpeg")


def test_shallowest_root_wins():
    names = ["a/b/train/NORMAL/1.jpeg", "a/b/test/NORMAL/1.jpeg", "a/train/NORMAL/1.jpeg", "a/test/NORMAL/1.jpeg"]
    assert find_split_root(names) == "a"


def test_two_entries_with_one_path_are_refused_as_ambiguous(tmp_path):
    """Tools disagree on which copy of a repeated name they extract; the archive is refused before any write."""
    import warnings

    path = tmp_path / "dup.zip"
    entries = dataset_entries()
    first = next(iter(entries))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns "Duplicate name" while writing
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in entries.items():
                archive.writestr(name, data)
            archive.writestr(first, b"\xff\xd8\xff a different, undecodable file")
    with pytest.raises(ArchiveError, match=f"ambiguous archive: more than one entry named '{first}'"):
        extract(path, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()
    from xray.storage.archive import extract_labelled

    with pytest.raises(ArchiveError, match="ambiguous archive"):
        extract_labelled(path, tmp_path / "site", LIMITS)
