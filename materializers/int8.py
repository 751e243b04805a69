"""A version's int8 outcome (xray.serving.runtimes.int8.Int8Outcome): the same files its registered folder carries in
``data/int8/`` (model.xml and model.bin where it passed its control, int8.json either way)."""

import os
from typing import Any, ClassVar

from zenml.enums import ArtifactType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from xray.serving.runtimes import int8


class Int8OutcomeMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (int8.Int8Outcome,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def save(self, data: int8.Int8Outcome) -> None:
        with self.get_temporary_directory(delete_at_exit=True) as temp:
            int8.save(data, temp)
            for name in os.listdir(temp):
                fileio.copy(os.path.join(temp, name), os.path.join(self.uri, name), overwrite=True)

    def load(self, data_type: type[Any]) -> int8.Int8Outcome:
        with self.get_temporary_directory(delete_at_exit=True) as temp:
            for name in fileio.listdir(self.uri):
                fileio.copy(os.path.join(self.uri, str(name)), os.path.join(temp, str(name)))
            return int8.load(temp)

    def extract_metadata(self, data: int8.Int8Outcome) -> dict[str, Any]:
        figures = {"int8": data.state, "seconds": float(data.seconds)}
        measured = {k: getattr(data, k) for k in ("val_auc_fp32", "val_auc_int8", "val_labels_unchanged")}
        return figures | {k: float(v) for k, v in measured.items() if v is not None}
