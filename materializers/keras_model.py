"""Keras 3 models as a single ``.keras`` file (ZenML has no Keras 3 materializer)."""

import os
from typing import Any, ClassVar

import keras
from zenml.enums import ArtifactType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

FILENAME = "model.keras"


class KerasModelMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (keras.Model,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def save(self, data: keras.Model) -> None:
        with self.get_temporary_directory(delete_at_exit=True) as temp:
            local = os.path.join(temp, FILENAME)
            data.save(local)
            fileio.copy(local, os.path.join(self.uri, FILENAME), overwrite=True)

    def load(self, data_type: type[Any]) -> keras.Model:
        with self.get_temporary_directory(delete_at_exit=True) as temp:
            local = os.path.join(temp, FILENAME)
            fileio.copy(os.path.join(self.uri, FILENAME), local)
            return keras.models.load_model(local)

    def extract_metadata(self, data: keras.Model) -> dict[str, Any]:
        return {
            "parameters": int(data.count_params()),
            "input_shape": str(tuple(data.input_shape)),
            "layers": len(data.layers),
        }
