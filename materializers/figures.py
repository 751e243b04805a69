"""A step's figures: one PNG per picture, and the dashboard's visualizations are the same files."""

import json
import os
from typing import Any, ClassVar

from PIL import Image
from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from xray.evaluation.plots import Figures

INDEX = "figures.json"


class FiguresMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (Figures,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: Figures) -> None:
        names = sorted(data.images)
        for name in names:
            with fileio.open(os.path.join(self.uri, f"{name}.png"), "wb") as handle:
                data.images[name].save(handle, format="PNG")
        with fileio.open(os.path.join(self.uri, INDEX), "w") as handle:
            handle.write(json.dumps(names))

    def load(self, data_type: type[Any]) -> Figures:
        with fileio.open(os.path.join(self.uri, INDEX), "r") as handle:
            names = json.loads(handle.read())
        images = {}
        for name in names:
            with fileio.open(os.path.join(self.uri, f"{name}.png"), "rb") as handle:
                image = Image.open(handle)
                image.load()
                images[name] = image.convert("RGB")
        return Figures(images)

    def save_visualizations(self, data: Figures) -> dict[str, VisualizationType]:
        return {os.path.join(self.uri, f"{name}.png"): VisualizationType.IMAGE for name in sorted(data.images)}

    def extract_metadata(self, data: Figures) -> dict[str, Any]:
        return {"figures": ", ".join(sorted(data.images))}
