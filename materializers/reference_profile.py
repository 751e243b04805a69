"""A model version's reference profile: its own JSON and arrays, the same files the MLflow model carries."""

import os
from typing import Any, ClassVar

from zenml.enums import ArtifactType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from xray.monitoring.ood import PROFILE_ARRAYS, PROFILE_JSON, ReferenceProfile


class ReferenceProfileMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (ReferenceProfile,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: ReferenceProfile) -> None:
        with self.get_temporary_directory(delete_at_exit=True) as temp:
            data.save(temp)
            for name in (PROFILE_JSON, PROFILE_ARRAYS):
                fileio.copy(os.path.join(temp, name), os.path.join(self.uri, name), overwrite=True)

    def load(self, data_type: type[Any]) -> ReferenceProfile:
        with self.get_temporary_directory(delete_at_exit=True) as temp:
            for name in (PROFILE_JSON, PROFILE_ARRAYS):
                fileio.copy(os.path.join(self.uri, name), os.path.join(temp, name))
            return ReferenceProfile.load(temp)

    def extract_metadata(self, data: ReferenceProfile) -> dict[str, Any]:
        return {
            "train_images": int(len(data.train_content)),
            "val_images": int(len(data.val_content)),
            "ood_threshold": float(data.threshold),
            "val_ood_fraction": float(data.val_ood_fraction),
        }
