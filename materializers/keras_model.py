"""Keras 3 models as a single ``.keras`` file (ZenML has no Keras 3 materializer).

The models this process saved or loaded last are kept by artifact URI (an artifact's files never change once
written): the steps of one run on the local orchestrator read the trained and the calibrated model four times in
all, and each ``load_model`` of ResNet50V2 cost about 1.2 s of CPU (cProfile of a smoke training run). A step in its
own process (SageMaker, a remote orchestrator) reads the file as before. Steps treat their input models as read-only
(none compiles, re-weights or re-trains one), which sharing the object requires."""

import os
from collections import OrderedDict
from typing import Any, ClassVar

import keras
from zenml.enums import ArtifactType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

FILENAME = "model.keras"
KEPT = 2
"""Models kept in memory: a run's trained and calibrated model."""
_recent: "OrderedDict[str, keras.Model]" = OrderedDict()


def _keep(uri: str, model: keras.Model) -> keras.Model:
    _recent[uri] = model
    _recent.move_to_end(uri)
    while len(_recent) > KEPT:
        _recent.popitem(last=False)
    return model


class KerasModelMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (keras.Model,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def save(self, data: keras.Model) -> None:
        with self.get_temporary_directory(delete_at_exit=True) as temp:
            local = os.path.join(temp, FILENAME)
            data.save(local)
            fileio.copy(local, os.path.join(self.uri, FILENAME), overwrite=True)
        _keep(self.uri, data)

    def load(self, data_type: type[Any]) -> keras.Model:
        if self.uri in _recent:
            return _keep(self.uri, _recent[self.uri])
        with self.get_temporary_directory(delete_at_exit=True) as temp:
            local = os.path.join(temp, FILENAME)
            fileio.copy(os.path.join(self.uri, FILENAME), local)
            return _keep(self.uri, keras.models.load_model(local))

    def extract_metadata(self, data: keras.Model) -> dict[str, Any]:
        return {
            "parameters": int(data.count_params()),
            "input_shape": str(tuple(data.input_shape)),
            "layers": len(data.layers),
        }
