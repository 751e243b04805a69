"""A step's figures: one PNG per picture, and the dashboard's visualizations are the same files."""

import json
import os
import re
from typing import Any, ClassVar

from PIL import Image
from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from xray.evaluation.plots import Figures

INDEX = "figures.json"
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}")


def files(data: Figures) -> dict[str, str]:
    """Each figure's file: its name where that is a plain file name, else a numbered one (a figure may be named after
    an image's source, ``s3://incoming/a.jpeg``, which is no file name)."""
    index = {}
    for number, name in enumerate(sorted(data.images)):
        plain = SAFE.fullmatch(name) is not None and not name.startswith("figure-")
        index[name] = f"{name}.png" if plain else f"figure-{number:03d}.png"
    return index


class FiguresMaterializer(BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (Figures,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: Figures) -> None:
        index = files(data)
        for name, file in index.items():
            with fileio.open(os.path.join(self.uri, file), "wb") as handle:
                data.images[name].save(handle, format="PNG")
        with fileio.open(os.path.join(self.uri, INDEX), "w") as handle:
            handle.write(json.dumps(index))

    def load(self, data_type: type[Any]) -> Figures:
        with fileio.open(os.path.join(self.uri, INDEX), "r") as handle:
            index = json.loads(handle.read())
        images = {}
        for name, file in index.items():
            with fileio.open(os.path.join(self.uri, file), "rb") as handle:
                image = Image.open(handle)
                image.load()
                images[name] = image.convert("RGB")
        return Figures(images)

    def save_visualizations(self, data: Figures) -> dict[str, VisualizationType]:
        return {os.path.join(self.uri, file): VisualizationType.IMAGE for file in files(data).values()}

    def extract_metadata(self, data: Figures) -> dict[str, Any]:
        return {"figures": ", ".join(sorted(data.images))}
