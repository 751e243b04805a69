"""Validated images + manifest, packed as one tar so remote stores see one object."""

import os
import tarfile
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from zenml.enums import ArtifactType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from xray.data.dataset import ValidatedDataset, fingerprint
from xray.data.manifest import COLUMNS

IMAGES, MANIFEST = "images.tar", "manifest.csv"
TEXT_COLUMNS = [column for column in COLUMNS if column not in ("width", "height", "channels")]


class ValidatedDatasetMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (ValidatedDataset,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: ValidatedDataset) -> None:
        with self.get_temporary_directory(delete_at_exit=True) as temp:
            tar_path = Path(temp) / IMAGES
            # Uncompressed: JPEGs do not compress, and reading back stays cheap.
            with tarfile.open(tar_path, "w") as tar:
                for relative in data.manifest["path"].dropna():  # rows without a file: unreadable inputs
                    tar.add(data.root / relative, arcname=relative)
            fileio.copy(str(tar_path), os.path.join(self.uri, IMAGES), overwrite=True)
        with fileio.open(os.path.join(self.uri, MANIFEST), "w") as handle:
            handle.write(data.manifest.to_csv(index=False))

    def load(self, data_type: type[Any]) -> ValidatedDataset:
        with fileio.open(os.path.join(self.uri, MANIFEST), "r") as handle:
            # The text columns as text: a site named "2026" stays a name, an empty UID stays empty (not NaN).
            manifest = pd.read_csv(handle, dtype=dict.fromkeys(TEXT_COLUMNS, str), keep_default_na=False)
        with self.get_temporary_directory(delete_at_exit=False) as temp:
            root = Path(temp)
            local_tar = root / IMAGES
            fileio.copy(os.path.join(self.uri, IMAGES), str(local_tar))
            with tarfile.open(local_tar) as tar:
                tar.extractall(root / "images", filter="data")  # no absolute paths, `..`, links or devices
            local_tar.unlink()
        return ValidatedDataset(root / "images", manifest)

    def extract_metadata(self, data: ValidatedDataset) -> dict[str, Any]:
        metadata = {"images": len(data.manifest)}
        if {"split", "label"} <= set(data.manifest.columns):
            counts = data.manifest.groupby(["split", "label"]).size()
            metadata |= {f"{s}/{l}": int(n) for (s, l), n in counts.items()}
        return metadata

    def compute_content_hash(self, data: ValidatedDataset) -> str:
        return fingerprint(data.manifest)
