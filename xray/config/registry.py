"""``registry:``, the registered model, its MLflow experiment and tracking URI, and the promotion gate."""

from __future__ import annotations

from pydantic import Field

from xray.config.base import Section

# The registered model's name: the one default every config, script and pipeline takes it from.
MODEL_NAME = "chest-xray-classifier"


class Int8Config(Section):
    """``registry.int8``: the int8 model made at registration (xray.serving.runtimes.int8), stored with the version
    where it passes its control on val."""

    enabled: bool = Field(True, description="Make an int8 model of each version at registration (NNCF, OpenVINO).")
    calibration_images: int = Field(300, ge=1, description="Train images NNCF calibrates int8 on.")
    max_drop: float = Field(
        0.005, gt=0, le=0.05, description="Val AUC int8 may lose against fp32; NNCF keeps layers fp32 until it holds."
    )
    min_labels_unchanged: float = Field(
        0.995, ge=0.5, le=1, description="Share of val labels at the version's threshold int8 must leave unchanged."
    )


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
    int8: Int8Config = Int8Config()
