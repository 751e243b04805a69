"""Where the dataset archive comes from, in a fixed order of precedence."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from xray.environment import REPO_ROOT
from xray.errors import DatasetSourceError

ENV_VAR = "CHEST_XRAY_ZIP"
SHARED_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "chest_xray_224.zip"
KAGGLE_DATASET = "paultimothymooney/chest-xray-pneumonia"
HOW_TO_GET = (
    f"no dataset archive found: pass --dataset-uri (s3://bucket/key.zip, a path or file://), set {ENV_VAR}, "
    f"place it at {SHARED_ARCHIVE}, or set KAGGLE_USERNAME/KAGGLE_KEY and `pip install kagglehub` to download "
    f"'{KAGGLE_DATASET}'"
)


@dataclass(frozen=True)
class DatasetSource:
    uri: str
    origin: str
    """'explicit' (flag or config), 'env', 'shared' or 'kaggle'."""

    @property
    def discovered_locally(self) -> bool:
        return self.origin != "explicit"


def resolve(explicit_uri: str | None, shared_archive: Path = SHARED_ARCHIVE) -> DatasetSource:
    """--dataset-uri / config, then $CHEST_XRAY_ZIP, then ../shared, then Kaggle."""
    if explicit_uri:
        return DatasetSource(explicit_uri, "explicit")
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR]).expanduser()
        if not path.is_file():
            raise DatasetSourceError(f"{ENV_VAR} points to {path}, which is not a file")
        return DatasetSource(str(path.resolve()), "env")
    if shared_archive.is_file():
        return DatasetSource(str(shared_archive), "shared")
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return DatasetSource(str(download_from_kaggle()), "kaggle")
    raise DatasetSourceError(HOW_TO_GET)


def download_from_kaggle(cache_dir: Path = Path(".cache")) -> Path:
    """Fetch with kagglehub (which extracts), then re-pack as one stored zip."""
    try:
        import kagglehub  # lazy: optional, installed only by users who download from Kaggle
    except ImportError:
        raise DatasetSourceError(
            "KAGGLE credentials are set but kagglehub is not installed: pip install kagglehub"
        ) from None
    target = cache_dir / "chest_xray_kaggle.zip"
    if target.is_file():
        return target
    try:
        folder = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as error:  # noqa: BLE001 - any download failure gets one clear line
        raise DatasetSourceError(f"kagglehub could not download {KAGGLE_DATASET}: {error}".splitlines()[0]) from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    partial.rename(target)
    return target
