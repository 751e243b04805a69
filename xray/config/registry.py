"""``registry:``, the registered model, its MLflow experiment and tracking URI, and the promotion gate."""

from __future__ import annotations

from pydantic import Field

from xray.config.base import Section

# The registered model's name: the one default every config, script and pipeline takes it from.
MODEL_NAME = "chest-xray-classifier"


class RegistryConfig(Section):
    model_name: str = MODEL_NAME
    experiment_name: str = "chest-xray-training"
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; MLFLOW_TRACKING_URI overrides; default: sqlite under .mlflow/."
    )
    champion_alias: str = "champion"
    require_approval: bool = Field(False, description="A version that passes the gate waits as candidate for approve.")
    candidate_alias: str = "candidate"
    margin: float = Field(
        0.01,
        ge=0,
        lt=0.5,
        description="Non-inferiority margin of the promotion gate: the lower bound of the paired "
        "bootstrap 95% CI of AUC(challenger) - AUC(champion) must be at least -margin, on test and on every gate site.",
    )
    gate_subgroups: bool = Field(False, description="Also gate on each DICOM subgroup of test (age band, sex...).")
    gate_subgroup_min_per_class: int = Field(20, ge=2, description="Images of each class a gated subgroup needs.")
    gate_sites: tuple[str, ...] = Field(
        (),
        description="Labelled sites (archive or folder URIs with NORMAL/ and PNEUMONIA/ "
        "folders) on which the challenger must also be non-inferior to the champion before promotion.",
    )
