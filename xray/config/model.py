"""``model:``, the network: its backbone, input size and normalisation, and its head."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from xray.config.base import Section


class ModelConfig(Section):
    backbone: Literal["resnet50v2", "efficientnetv2b0", "mobilenetv3large"] = Field(
        "resnet50v2", description="keras.applications backbone under the classifier head; ResNet50V2 is the default."
    )
    weights: str = Field("none", description="'imagenet', 'none', or a local or s3:// path to a Keras weights file.")
    image_size: int = Field(128, ge=32, le=1024)
    input_normalization: Literal["fixed", "per_image"] = Field(
        "fixed",
        description="fixed: the backbone's [-1, 1] scaling. per_image: standardise each image to zero mean and "
        "unit variance inside the model, so exposure and contrast differences between sites cannot move the score.",
    )
    dense_units: int = Field(128, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
