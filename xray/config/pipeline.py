"""The one validated config model, :class:`PipelineConfig`: the top-level keys of ``configs/*.yaml``, each section
from the module of its key (``xray/config/<key>.py``). The YAML keys, the step parameters, the MLflow params
(flattened with dots, e.g. ``train.batch_size``) and the docs all use these names."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from xray.config.base import Section, flatten
from xray.config.change_plan import ChangePlanConfig
from xray.config.data import DataConfig
from xray.config.evaluate import EvaluateConfig
from xray.config.inference import InferenceConfig
from xray.config.model import ModelConfig
from xray.config.monitoring import MonitoringConfig
from xray.config.node import NodeConfig
from xray.config.registry import RegistryConfig
from xray.config.s3 import S3Config
from xray.config.scope import ScopeConfig
from xray.config.train import TrainConfig
from xray.config.tuning import TuningConfig


class PipelineConfig(Section):
    dataset_uri: str | None = Field(
        None,
        description="s3://bucket/key.zip, a local path or file://. None: CHEST_XRAY_ZIP, ../shared, then kagglehub.",
    )
    expected_sha256: str | None = Field(None, description="Fail before extraction when the archive differs.")
    seed: int = 42
    s3: S3Config = S3Config()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    inference: InferenceConfig = InferenceConfig()
    scope: ScopeConfig = ScopeConfig()
    registry: RegistryConfig = RegistryConfig()
    change_plan: ChangePlanConfig | None = Field(
        None,
        description="The predetermined change control plan: what a new version may change and the criteria that "
        "decide it (its criteria replace registry.margin and evaluate.min_sensitivity at the gate). None: no plan.",
    )
    node: NodeConfig = NodeConfig()
    tuning: TuningConfig | None = Field(None, description="The search of --pipeline tuning; unused by other pipelines.")
    zenml: dict[str, Any] | None = Field(
        None,
        description="ZenML run configuration (settings, steps.<name>.step_operator, ...), handed to ZenML as is; "
        "ZenML validates it. This is where a stack's step operator and Docker settings are chosen.",
    )

    @field_validator("expected_sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())):
            raise ValueError("must be 64 hex characters")
        return value.lower() if value else value

    def flat_params(self) -> dict[str, Any]:
        """Dotted names, as logged to MLflow: ``train.batch_size`` etc."""
        return flatten(self.model_dump(mode="json", exclude={"zenml"}))
