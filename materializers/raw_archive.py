"""The dataset archive, byte for byte, with its provenance.

The content hash is the archive's SHA-256, so the steps downstream of ingest
are cached by what the object holds, never by a stale key.
"""

import json
import os
from pathlib import Path
from typing import Any, ClassVar

from zenml.enums import ArtifactType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from xray.storage.fetch import RawArchive


class RawArchiveMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (RawArchive,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: RawArchive) -> None:
        fileio.copy(str(data.path), os.path.join(self.uri, "archive.zip"), overwrite=True)
        with fileio.open(os.path.join(self.uri, "provenance.json"), "w") as handle:
            handle.write(json.dumps(data.metadata()))

    def load(self, data_type: type[Any]) -> RawArchive:
        with fileio.open(os.path.join(self.uri, "provenance.json"), "r") as handle:
            meta = json.loads(handle.read())
        with self.get_temporary_directory(delete_at_exit=False) as temp:
            local = Path(temp) / "archive.zip"
            fileio.copy(os.path.join(self.uri, "archive.zip"), str(local))
        return RawArchive(local, meta["source_uri"], meta["size"], meta["sha256"], meta["etag"] or None)

    def extract_metadata(self, data: RawArchive) -> dict[str, Any]:
        return data.metadata()

    def compute_content_hash(self, data: RawArchive) -> str:
        return data.sha256
