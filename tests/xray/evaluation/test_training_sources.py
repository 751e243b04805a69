"""Several labelled training sources (data.sources): config, labels files, patient-stable splits, duplicates across
sources, per-site results and operating points. Images are small synthetic PNGs (and DICOMs from
fixtures/dicom_factory.py); the end-to-end run with two sources is tests/pipelines/test_local_stack.py."""

import json

import numpy as np
import pandas as pd
import pytest

from fixtures.dicom_factory import radiograph
from support import jpeg_bytes, png
from xray.config.data import SourceConfig
from xray.config.evaluate import EvaluateConfig
from xray.config.pipeline import PipelineConfig
from xray.config_file import parse_config
from xray.data.dataset import ValidatedDataset, add_sources
from xray.data.manifest import DataReport, age_band, split_counts, stable_splits
from xray.data.sites import identify_source, load_source
from xray.errors import ConfigError, DatasetSourceError
from xray.evaluation.recipes import by_subgroup, per_site
from xray.registry.promotion import subgroup_masks

S3 = PipelineConfig().s3


def image(seed: int) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 255, (24, 24), dtype=np.uint8))


def folder_source(root, per_class: int, start: int = 0, names: str = "kermany"):
    """NORMAL/ and PNEUMONIA/ folders, Kermany-style names (one patient per 2 images) unless ``names`` is plain."""
    for label in ("NORMAL", "PNEUMONIA"):
        (root / "scans" / label).mkdir(parents=True, exist_ok=True)
        for index in range(start, start + per_class):
            seed = index if label == "NORMAL" else 100_000 + index
            name = (
                f"IM-{index // 2:04d}-{index % 2:04d}.png"
                if label == "NORMAL" and names == "kermany"
                else f"person{index // 2}_bacteria_{index}.png"
                if names == "kermany"
                else f"{label.lower()}-{index}.png"
            )
            (root / "scans" / label / name).write_bytes(image(seed))
    return root


def data_config(*sources, **changes):
    raw = {"sources": [{"site": "guangzhou"}, *sources], "max_bad_fraction": 0.5} | changes
    return parse_config({"data": raw}).data


def load(source: dict, tmp_path, name="dataset", **changes):
    data = data_config(source, **changes)
    (config,) = data.extra_sources
    root = tmp_path / name
    return load_source(config, identify_source(config, S3), root, data, S3, tmp_path / f"{name}-work")


# -- config ------------------------------------------------------------------------------------------------------


def test_the_default_is_the_dataset_archive_alone_as_one_site():
    data = PipelineConfig().data
    assert [(s.site, s.uri) for s in data.sources] == [("guangzhou", None)]
    assert data.base_site == "guangzhou" and data.extra_sources == ()


@pytest.mark.parametrize(
    "sources, message",
    [
        ([{"site": "a"}, {"site": "b"}], "exactly one source must be the dataset archive"),
        ([{"site": "a", "uri": "/x"}], "exactly one source must be the dataset archive"),
        ([{"site": "a"}, {"site": "A", "uri": "/x"}], "site names must be unique"),
        ([{"site": "a", "labels": "l.csv"}], "keeps its own splits and folder labels"),
        ([{"site": "a"}, {"site": "b c", "uri": "/x"}], "data.sources.1.site"),
    ],
)
def test_a_bad_sources_list_is_one_config_error(sources, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"data": {"sources": sources}})


# -- patient-stable splits -----------------------------------------------------------------------------------------


def _manifest(patients: int, offset: int = 0) -> pd.DataFrame:
    ids = [f"normal:p{i}" for i in range(offset, offset + patients)]
    return pd.DataFrame({"patient_id": ids, "sha256": [f"{i:064x}" for i in range(offset, offset + patients)]})


def test_a_patients_split_depends_only_on_the_key_the_site_and_the_patient():
    first = stable_splits(_manifest(3000), "b", 0.15, 0.15, "k")
    grown = stable_splits(pd.concat([_manifest(500, 9000), _manifest(3000)], ignore_index=True), "b", 0.15, 0.15, "k")
    assert list(grown.iloc[500:]) == list(first)  # no earlier patient moved when the site grew
    shares = first.value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.04 and abs(shares["val"] - 0.15) < 0.03 and abs(shares["test"] - 0.15) < 0.03
    assert list(stable_splits(_manifest(3000), "c", 0.15, 0.15, "k")) != list(first)  # keyed by site
    assert list(stable_splits(_manifest(3000), "b", 0.15, 0.15, "other")) != list(first)  # and by key


def test_images_of_one_patient_share_a_split_and_a_nameless_image_is_split_by_content():
    manifest = pd.DataFrame(
        {
            "patient_id": ["normal:p1"] * 5 + ["image:a.png", "image:moved/a.png"],
            "sha256": [f"{i:064x}" for i in range(5)] + ["f" * 64, "f" * 64],
        }
    )
    splits = stable_splits(manifest, "b", 0.3, 0.3, "k")
    assert splits.iloc[:5].nunique() == 1 and splits.iloc[5] == splits.iloc[6]


def test_adding_images_to_a_site_keeps_every_earlier_images_split(tmp_path):
    source = {"site": "b", "uri": str(folder_source(tmp_path / "site", 30))}
    before, report = load(source, tmp_path, "before")
    assert report["splits_from"] == "patient hash (data.split)"
    folder_source(tmp_path / "site", 20, start=30)
    after, grown = load(source, tmp_path, "after")
    assert grown["digest"] != report["digest"] and len(after) == len(before) + 40
    merged = before.merge(after, on="sha256", suffixes=("_before", "_after"))
    assert len(merged) == len(before) and (merged["split_before"] == merged["split_after"]).all()
    assert set(after["split"]) == {"train", "val", "test"}
    assert all(path.startswith("sites/b/scans/") for path in after["path"]) and set(after["site"]) == {"b"}
    # Kermany names: the two images of a patient never straddle splits
    assert after.groupby("patient_id")["split"].nunique().max() == 1


def test_a_source_with_its_own_train_and_test_keeps_them(tmp_path):
    root = tmp_path / "archive-like"
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            (root / split / label).mkdir(parents=True)
            for index in range(3):
                (root / split / label / f"{split}-{label}-{index}.jpeg").write_bytes(
                    jpeg_bytes(hash((split, label, index)) % 1000)
                )
    manifest, report = load({"site": "b", "uri": str(root)}, tmp_path, min_val_per_class=1)
    assert report["splits_from"] == "the source's own folders"
    test = manifest[manifest["split"] == "test"]
    assert len(test) == 6 and test["path"].str.contains("/test/").all()
    with pytest.raises(DatasetSourceError, match="splits: archive needs train/ and test/ folders"):
        load({"site": "c", "uri": str(folder_source(tmp_path / "flat", 4)), "splits": "archive"}, tmp_path, "c")


# -- labels files --------------------------------------------------------------------------------------------------


def _unlabelled(folder, count=12):
    folder.mkdir(parents=True)
    for index in range(count):
        (folder / f"study-{index}.png").write_bytes(image(index))
    (folder / "notes.txt").write_text("not an image, and not in the labels")
    return folder


def test_a_spreadsheets_labels_file_with_a_byte_order_mark_semicolons_and_extra_columns_is_read(tmp_path):
    folder = _unlabelled(tmp_path / "flat")
    labels = tmp_path / "labels.csv"
    rows = [f"study-{i}.png;{'PNEUMONIA' if i % 2 else 'NORMAL'};reader {i}" for i in range(12)]
    labels.write_bytes(("File;Label;Reader\r\n" + "\r\n".join(rows) + "\r\n").encode("utf-8-sig"))
    manifest, report = load({"site": "b", "uri": str(folder), "labels": str(labels)}, tmp_path)
    assert len(manifest) == 12 and report["labels_without_image"] == 0
    assert (manifest["label"] == "PNEUMONIA").sum() == 6


def test_labels_by_file_name_label_a_flat_folder(tmp_path):
    folder = _unlabelled(tmp_path / "flat")
    labels = tmp_path / "labels.csv"
    rows = [f"study-{i}.png,{'pneumonia' if i % 2 else 'Normal'}" for i in range(10)] + ["gone.png,NORMAL"]
    labels.write_text("file,label\n" + "\n".join(rows) + "\n")
    manifest, report = load({"site": "b", "uri": str(folder), "labels": str(labels)}, tmp_path)
    assert len(manifest) == 10 and report["unlabelled_files"] == 3 and report["labels_without_image"] == 1
    by_name = dict(zip(manifest["path"].str.rsplit("/", n=1).str[-1], manifest["label"]))
    assert by_name["study-1.png"] == "PNEUMONIA" and by_name["study-2.png"] == "NORMAL"


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,label\nstudy-1.png,BACTERIA\n", "unknown label 'BACTERIA' on line 2"),
        ("name,diagnosis\nstudy-1.png,NORMAL\n", "needs a `label` column and one of `file` or `sop_instance_uid`"),
        ("file,label\nstudy-1.png,NORMAL\nstudy-1.png,PNEUMONIA\n", "with both labels, e.g. line 2"),
        ("file,label\n,NORMAL\n", "empty `file` on line 2"),
        ("", "not a readable CSV"),
        ('file,label\n"study-1.png,NORMAL\n', "not a readable CSV"),
    ],
)
def test_a_malformed_labels_file_is_one_line_naming_the_source(tmp_path, text, message):
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    with pytest.raises(DatasetSourceError, match="source b") as error:
        load({"site": "b", "uri": str(_unlabelled(tmp_path / "flat")), "labels": str(labels)}, tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_file_name_in_two_folders_must_be_given_by_its_path(tmp_path):
    folder = tmp_path / "two"
    for part in ("a", "b"):
        (folder / part).mkdir(parents=True)
        for index in range(4):
            (folder / part / f"x{index}.png").write_bytes(image(index + (10 if part == "b" else 0)))
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nx0.png,NORMAL\n")
    with pytest.raises(DatasetSourceError, match="in 2 folders; give its path"):
        load({"site": "b", "uri": str(folder), "labels": str(labels)}, tmp_path)
    rows = [f"{part}/x{i}.png,{'NORMAL' if part == 'a' else 'PNEUMONIA'}" for part in "ab" for i in range(4)]
    labels.write_text("file,label\n" + "\n".join(rows) + "\n")
    manifest, _ = load({"site": "b", "uri": str(folder), "labels": str(labels)}, tmp_path, "paths")
    assert len(manifest) == 8 and (manifest.loc[manifest["path"].str.contains("/b/x"), "label"] == "PNEUMONIA").all()


def test_labels_by_sop_instance_uid_label_dicoms_and_splits_need_the_site_secret(tmp_path, monkeypatch):
    import pydicom

    folder = tmp_path / "pacs-export"
    folder.mkdir()
    uids = {}
    for index in range(12):
        data = radiograph(np.full((24, 24), 40 + 10 * index, dtype=np.uint8), PatientID=f"PID{index // 2}")
        (folder / f"{index:03d}").write_bytes(data)  # no extension, as PACS exports often are
        uids[index] = pydicom.dcmread(folder / f"{index:03d}").SOPInstanceUID
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "sop_instance_uid,label\n"
        + "\n".join(f"{uid},{'PNEUMONIA' if i % 4 >= 2 else 'NORMAL'}" for i, uid in uids.items() if i < 11)
        + "\n1.2.3.4.5,NORMAL\n"
    )
    source = {"site": "b", "uri": str(folder), "labels": str(labels)}
    monkeypatch.delenv("XRAY_PATIENT_KEY", raising=False)
    with pytest.raises(ConfigError, match="set XRAY_PATIENT_KEY"):
        load(source, tmp_path, "unkeyed")
    monkeypatch.setenv("XRAY_PATIENT_KEY", "site-secret")
    manifest, report = load(source, tmp_path, "keyed")
    assert len(manifest) == 11 and report["unlabelled_files"] == 1 and report["labels_without_image"] == 1
    assert manifest["patient_id"].str.startswith("dicom:").all() and manifest["patient_id"].nunique() == 6
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1
    # the header's subgroups are kept (and nothing that identifies the patient)
    assert set(manifest["view"]) == {"PA"} and set(manifest["sex"]) == {"F"} and set(manifest["age_band"]) == {"3-5"}
    assert set(manifest["manufacturer"]) == {"xray-pipeline tests"}
    again, _ = load(source, tmp_path, "again")
    assert list(again.sort_values("sha256")["split"]) == list(manifest.sort_values("sha256")["split"])


def test_a_source_without_both_classes_or_that_cannot_be_read_is_one_line(tmp_path):
    one_class = tmp_path / "one"
    (one_class / "NORMAL").mkdir(parents=True)
    for index in range(3):
        (one_class / "NORMAL" / f"{index}.png").write_bytes(image(index))
    with pytest.raises(DatasetSourceError, match="source b .*no labelled PNEUMONIA images"):
        load({"site": "b", "uri": str(one_class)}, tmp_path)
    with pytest.raises(DatasetSourceError, match=r"source b \(.*missing.zip\): dataset archive not found"):
        identify_source(SourceConfig(site="b", uri=str(tmp_path / "missing.zip")), S3)


def test_a_sources_digest_follows_its_images_and_its_labels(tmp_path):
    folder = _unlabelled(tmp_path / "flat")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nstudy-1.png,NORMAL\n")
    source = SourceConfig(site="b", uri=str(folder), labels=str(labels))
    first = identify_source(source, S3)["digest"]
    assert identify_source(source, S3)["digest"] == first
    labels.write_text("file,label\nstudy-1.png,PNEUMONIA\n")
    relabelled = identify_source(source, S3)["digest"]
    (folder / "study-99.png").write_bytes(image(99))
    assert len({first, relabelled, identify_source(source, S3)["digest"]}) == 3


# -- several sources in one dataset --------------------------------------------------------------------------------


def _rows(site, split, shas, root):
    for sha in shas:
        (root / site / f"{sha[:6]}-{split}.png").parent.mkdir(parents=True, exist_ok=True)
        (root / site / f"{sha[:6]}-{split}.png").write_bytes(b"x")
    return pd.DataFrame(
        {
            "path": [f"{site}/{sha[:6]}-{split}.png" for sha in shas],
            "split": split,
            "label": "NORMAL",
            "patient_id": [f"{site}:{sha}" for sha in shas],
            "sha256": shas,
            "site": site,
        }
    )


def test_an_image_in_several_sources_is_kept_once_in_its_highest_split_and_earliest_source(tmp_path):
    a, b, c, d = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
    base = _rows("guangzhou", "train", [a, b, d], tmp_path)
    report = DataReport(split_counts(base), 0, 0, [], 0, 0, 0, [], 0, 0, "archive", sites={"guangzhou": {"counts": {}}})
    dataset = ValidatedDataset(tmp_path, base)
    second = pd.concat([_rows("s2", "test", [a], tmp_path), _rows("s2", "train", [b, c], tmp_path)])
    third = _rows("s3", "train", [c, d], tmp_path)
    add_sources(dataset, report, [(second, {"site": "s2", "counts": {}}), (third, {"site": "s3", "counts": {}})])
    kept = dataset.manifest.set_index("sha256")
    assert len(kept) == 4 and kept.index.is_unique
    assert kept.loc[a, "split"] == "test" and kept.loc[a, "site"] == "s2"  # test wins over train
    assert kept.loc[b, "site"] == "guangzhou" and kept.loc[c, "site"] == "s2" and kept.loc[d, "site"] == "guangzhou"
    assert report.duplicates_across_sources == 4 and report.sites["s3"]["duplicates_in_earlier_sources"] == 2
    assert not (tmp_path / "s3" / f"{c[:6]}-train.png").exists() and (tmp_path / "s2" / f"{c[:6]}-train.png").exists()


# -- per-site results and operating points -------------------------------------------------------------------------


def _scored(rng, site, n, shift):
    y = np.tile([0, 1], n // 2)
    p = np.clip(1 / (1 + np.exp(-(3 * (y - 0.5) + shift + rng.normal(0, 1, n)))), 1e-4, 1 - 1e-4)
    return pd.DataFrame({"site": site, "label": np.where(y, "PNEUMONIA", "NORMAL")}), p


def test_every_site_gets_test_metrics_with_cis_and_its_own_operating_point_where_its_val_allows():
    rng = np.random.default_rng(0)
    evaluate = EvaluateConfig(min_recalibration_per_class=20, bootstrap_samples=200)
    parts = [_scored(rng, "guangzhou", 200, 0.0), _scored(rng, "b", 200, 2.0), _scored(rng, "c", 20, 0.0)]
    val = pd.concat([rows for rows, _ in parts], ignore_index=True)
    p_val = np.concatenate([p for _, p in parts])
    parts = [_scored(rng, "guangzhou", 200, 0.0), _scored(rng, "b", 200, 2.0), _scored(rng, "c", 20, 0.0)]
    test = pd.concat([rows for rows, _ in parts], ignore_index=True)
    p_test = np.concatenate([p for _, p in parts])
    sites = per_site(val, test, p_val, p_test, 0.5, evaluate, 0)
    assert set(sites) == {"guangzhou", "b", "c"}
    for entry in sites.values():
        measured = entry["test"]
        assert measured["auc_ci_low"] <= measured["auc"] <= measured["auc_ci_high"]
    # site b's scores run high: at the version's threshold it loses specificity; its own point wins it back
    own = sites["b"]["test_at_operating_point"]
    assert sites["b"]["operating_point"]["threshold"] != 0.5
    assert own["specificity"] > sites["b"]["test"]["specificity"] + 0.1
    assert own["ece"] < sites["b"]["test"]["ece"]
    assert sites["c"]["operating_point"] is None and "fewer than" in sites["c"]["notes"][0]
    mask_val, mask_test = (val["site"] == "b").to_numpy(), (test["site"] == "b").to_numpy()
    only = per_site(val[mask_val], test[mask_test], p_val[mask_val], p_test[mask_test], 0.5, evaluate, 0)
    assert set(only) == {"b"} and only["b"]["operating_point"] is None and only["b"]["test"]["images"] == 200


def test_a_site_operating_point_moves_the_answer_and_says_so(predictor):
    from xray.serving.predictor import ChestXrayPredictor

    data = png(np.full((32, 32), 120, dtype=np.uint8))
    base = predictor.predict_bytes([data]).iloc[0]
    point = {"calibration": {"method": "platt", "temperature": 0.5, "bias": 1.0}, "threshold": 0.9}
    with_site = ChestXrayPredictor(predictor.model, 0.5, 32, "7", predictor.profile, operating_points={"b": point})
    row = with_site.predict_bytes([data], "b").iloc[0]
    z = np.log(base["probability"] / (1 - base["probability"]))
    assert row["probability"] == pytest.approx(1 / (1 + np.exp(-(z / 0.5 + 1.0))))
    assert row["threshold"] == 0.9 and row["operating_point"] == "site:b" and row["site"] == "b"
    assert base["operating_point"] == "version" and base["site"] == ""
    with pytest.raises(ConfigError, match=r"no operating point for site 'x' \(it has: b\)"):
        with_site.predict_bytes([data], "x")


@pytest.mark.parametrize(
    "years, band",
    [(None, ""), (0.5, "under 1"), (1.0, "1-2"), (2.99, "1-2"), (5.9, "3-5"), (17, "6-17"), (45, "18 and over")],
)
def test_age_bands(years, band):
    assert age_band(years) == band


def test_metrics_by_subgroup_have_cis_and_counts_and_small_groups_are_not_gated():
    rng = np.random.default_rng(1)
    n = 240
    y = np.tile([0, 1], n // 2)
    p = np.clip(1 / (1 + np.exp(-(3 * (y - 0.5) + rng.normal(0, 1, n)))), 1e-4, 1 - 1e-4)
    view = np.where(np.arange(n) < 200, "PA", "AP")
    view[200:205] = ""  # a JPEG row, or a header without ViewPosition
    rows = pd.DataFrame({"view": view, "sex": "", "age_band": np.where(np.arange(n) % 3, "1-2", "3-5")})
    rows.loc[230:, "view"] = "LL"
    y[230:] = 1  # one class only
    result = by_subgroup(rows, y, p, 0.5, EvaluateConfig(bootstrap_samples=200), 0)
    assert set(result) == {"view", "age_band"}  # no test image has a sex
    pa = result["view"]["PA"]
    assert pa["auc_ci_low"] <= pa["auc"] <= pa["auc_ci_high"] and pa["images"] == 200
    assert result["view"]["LL"] == {"images": 10, "counts": {"NORMAL": 0, "PNEUMONIA": 10}}
    masks = subgroup_masks(rows, y, 20)
    assert set(masks) == {"subgroup:view=PA", "subgroup:age_band=1-2", "subgroup:age_band=3-5"}
    assert masks["subgroup:view=PA"].sum() == 200


def test_an_s3_prefix_is_a_source_whose_digest_follows_its_objects(tmp_path):
    from xray.storage import s3

    server = s3.EmbeddedS3().start()
    try:
        client = s3.make_client(max_attempts=1)
        client.create_bucket(Bucket="hospital")
        folder = folder_source(tmp_path / "site", 10)
        for file in sorted(folder.rglob("*.png")):
            client.upload_file(str(file), "hospital", f"exports/b/{file.relative_to(folder).as_posix()}")
        client.put_object(Bucket="hospital", Key="exports/b/.DS_Store", Body=b"junk")
        source = {"site": "b", "uri": "s3://hospital/exports/b"}
        manifest, report = load(source, tmp_path)
        assert len(manifest) == 20 and report["junk_files"] == 1 and set(manifest["label"]) == {"NORMAL", "PNEUMONIA"}
        from_folder, _ = load({"site": "b", "uri": str(folder)}, tmp_path, "folder")
        assert dict(zip(manifest["sha256"], manifest["split"])) == dict(
            zip(from_folder["sha256"], from_folder["split"])
        )
        first = identify_source(SourceConfig(**source), S3)["digest"]
        client.put_object(Bucket="hospital", Key="exports/b/scans/NORMAL/new.png", Body=image(7))
        assert identify_source(SourceConfig(**source), S3)["digest"] != first
        with pytest.raises(DatasetSourceError, match=r"source c \(s3://hospital/nothing\): no files under"):
            identify_source(SourceConfig(site="c", uri="s3://hospital/nothing"), S3)
    finally:
        server.stop()


def test_a_dicom_training_source_keeps_no_identifying_value_in_its_manifest_report_or_files(tmp_path, monkeypatch):
    from fixtures.dicom_factory import SENTINELS

    monkeypatch.setenv("XRAY_PATIENT_KEY", "site-secret")
    for label, offset in (("NORMAL", 0), ("PNEUMONIA", 100)):
        (tmp_path / "site" / label).mkdir(parents=True)
        for index in range(4):
            level = np.full((24, 24), 30 + offset + 10 * index, dtype=np.uint8)
            (tmp_path / "site" / label / f"{index}.dcm").write_bytes(radiograph(level, sentinels=True))
    manifest, report = load({"site": "b", "uri": str(tmp_path / "site")}, tmp_path)
    assert len(manifest) == 8
    kept = manifest.to_csv() + json.dumps(report, default=str)
    kept += "".join(p.read_bytes().decode("latin-1") for p in (tmp_path / "dataset").rglob("*") if p.is_file())
    values = [str(v) for v in SENTINELS.values()] + [part for v in SENTINELS.values() for part in str(v).split("^")]
    assert not [value for value in values if len(value) >= 6 and value in kept]
