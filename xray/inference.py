"""Batch inference inputs: images from a folder, a zip or an S3 prefix, screened before prediction.

Unreadable images never abort a batch: they get a row with a status that says why.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from xray import s3
from xray.archive import check_entry, is_junk
from xray.dataset import ValidatedDataset
from xray.errors import DatasetSourceError
from xray.manifest import check_image

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
COLUMNS = ["path", "source", "status"]


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES and not is_junk(name)


def _from_s3(uri: str, max_attempts: int) -> list[tuple[str, bytes]]:
    from botocore.exceptions import BotoCoreError, ClientError

    location = s3.parse_s3_uri(uri)
    client = s3.make_client(max_attempts)
    items = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key):
            for entry in page.get("Contents", []):
                if _is_image(entry["Key"]):
                    body = client.get_object(Bucket=location.bucket, Key=entry["Key"])["Body"].read()
                    items.append((f"s3://{location.bucket}/{entry['Key']}", body))
    except (BotoCoreError, ClientError) as error:
        raise s3.explain_error(error, location) from None
    return items


def _from_zip(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        infos = [info for info in archive.infolist() if not info.is_dir() and _is_image(info.filename)]
        for info in infos:
            check_entry(info)
        return [(f"{path}!{info.filename}", archive.read(info)) for info in infos]


def gather(source: str, max_attempts: int = 5) -> list[tuple[str, bytes]]:
    """(display path, bytes) for every JPEG/PNG under a folder, in a zip, or under an s3:// prefix."""
    if source.startswith("s3://"):
        items = _from_s3(source, max_attempts)
    else:
        path = Path(source.removeprefix("file://")).expanduser()
        if path.is_dir():
            items = [(str(p), p.read_bytes()) for p in sorted(path.rglob("*")) if p.is_file() and _is_image(p.name)]
        elif path.is_file() and zipfile.is_zipfile(path):
            items = _from_zip(path)
        elif path.is_file() and path.suffix.lower() == ".zip":
            raise DatasetSourceError(f"{source} is not a readable zip archive")
        elif path.is_file():
            items = [(str(path), path.read_bytes())]
        else:
            raise DatasetSourceError(f"no images at {source}: not a folder, zip, file or s3:// prefix")
    if not items:
        raise DatasetSourceError(f"no .jpeg, .jpg or .png images found at {source}")
    return sorted(items)


def screen(items: list[tuple[str, bytes]], workdir: Path) -> ValidatedDataset:
    """Decode each image once; readable ones are written under workdir, the rest keep a status."""
    rows = []
    for index, (name, data) in enumerate(items):
        check = check_image(data)
        if not check.ok:
            rows.append({"path": None, "source": name, "status": f"unreadable: {check.reason}"})
            continue
        relative = f"{index:06d}{'.png' if check.converted is not None else Path(name).suffix.lower()}"
        (workdir / relative).write_bytes(check.converted if check.converted is not None else data)
        rows.append({"path": relative, "source": name, "status": "ok"})
    return ValidatedDataset(workdir, pd.DataFrame(rows, columns=COLUMNS))


PREDICTION_COLUMNS = ["path", "probability", "label", "threshold", "ood_score", "status", "reason", "model_version"]


def predict_images(predictor, images: ValidatedDataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions, feature table): one prediction row per input image in input order, and the
    out-of-distribution features of the readable ones (:func:`xray.ood.feature_table`).

    Probabilities come through tf.data in batches; each readable image is also read once more for its
    out-of-distribution features, scored against the version's reference profile.
    """
    from xray import ood
    from xray.data import make_spec_for_inference
    from xray.predict import predict_paths

    readable = images.manifest[images.manifest["status"] == "ok"]
    paths = images.paths(readable)
    probabilities = predict_paths(predictor.model, paths, make_spec_for_inference(predictor.image_size))
    features = ood.features_of_files(paths)
    rows = predictor.rows(probabilities, predictor.assess(features))
    table = predictions_table(images, rows, predictor.threshold, predictor.version)
    return table, ood.feature_table(features, predictor.profile)


def predictions_table(images: ValidatedDataset, rows: pd.DataFrame, threshold: float, version: str) -> pd.DataFrame:
    """One row per input image, in input order; ``rows`` (ChestXrayPredictor.rows) for the readable ones.

    Unreadable images have no probability, status ``unreadable`` and the decoder's reason.
    """
    from xray.ood import UNREADABLE

    table = images.manifest.rename(columns={"path": "local_path", "source": "path"}).copy()
    readable = (table["status"] == "ok").to_numpy()
    for column in ("probability", "ood_score"):
        table[column] = np.nan
    table["label"] = ""
    table["reason"] = table["status"].where(~readable, "").str.removeprefix(f"{UNREADABLE}: ")
    table["status"] = UNREADABLE
    if readable.any():
        for column in ("probability", "label", "ood_score", "status", "reason"):
            table.loc[readable, column] = rows[column].to_numpy()
    table["threshold"] = threshold
    table["model_version"] = version
    return table[PREDICTION_COLUMNS]
