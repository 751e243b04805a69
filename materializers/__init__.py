"""How the project's own types are stored in (and loaded from) the artifact store."""

from materializers.figures import FiguresMaterializer
from materializers.int8 import Int8OutcomeMaterializer
from materializers.keras_model import KerasModelMaterializer
from materializers.raw_archive import RawArchiveMaterializer
from materializers.reference_profile import ReferenceProfileMaterializer
from materializers.validated_dataset import ValidatedDatasetMaterializer

__all__ = [
    "FiguresMaterializer",
    "Int8OutcomeMaterializer",
    "KerasModelMaterializer",
    "RawArchiveMaterializer",
    "ReferenceProfileMaterializer",
    "ValidatedDatasetMaterializer",
]
