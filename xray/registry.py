"""MLflow model registry: log, register, and the champion promotion gate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np

def pip_requirements() -> list[str]:
    """Pinned from what is installed; MLflow's inference would load TF in a subprocess."""
    pins = []
    for package in ("tensorflow-cpu", "keras", "mlflow", "pillow", "numpy"):
        try:
            pins.append(f"{package}=={version(package)}")
        except Exception:  # noqa: BLE001 - a missing optional dist just is not pinned
            continue
    return pins


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    previous_champion: str | None


def decide(test_auc: float, test_sensitivity: float, min_sensitivity: float,
           champion_version: str | None, champion_auc: float | None) -> PromotionDecision:
    """Champion only if sensitivity holds at the chosen threshold and AUC does not regress."""
    if not test_sensitivity >= min_sensitivity:
        return PromotionDecision(False, f"test_sensitivity {test_sensitivity:.4f} < min_sensitivity {min_sensitivity:g}", champion_version)
    if champion_version is None:
        return PromotionDecision(True, f"no champion yet; test_sensitivity {test_sensitivity:.4f} >= {min_sensitivity:g}", None)
    if champion_auc is None or test_auc >= champion_auc:
        return PromotionDecision(True, f"test_auc {test_auc:.4f} >= champion v{champion_version} test_auc {champion_auc}", champion_version)
    return PromotionDecision(False, f"test_auc {test_auc:.4f} < champion v{champion_version} test_auc {champion_auc:.4f}", champion_version)


def current_champion(client, model_name: str, alias: str) -> tuple[str | None, float | None]:
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None, None
    auc = champion.tags.get("test_auc")
    return str(champion.version), (float(auc) if auc is not None else None)


class _KerasFlavor:
    """mlflow.keras, with the model directory created before the input example is written.

    mlflow 3.17's keras ``save_model`` writes ``input_example.json`` into a
    directory it only creates afterwards, so ``mlflow.keras.log_model`` with an
    input example fails. Everything else is mlflow.keras itself.
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path, **kwargs):
        import os

        import mlflow.keras

        os.makedirs(path, exist_ok=True)
        return mlflow.keras.save_model(path=path, **kwargs)


def log_and_register(model, model_name: str, metadata: dict, image_size: int) -> tuple[str, str]:
    """Log the Keras model to the active run and register it; return (model_uri, version)."""
    import mlflow
    from mlflow.models import infer_signature

    example = np.full((1, image_size, image_size, 3), 128.0, dtype=np.float32)
    signature = infer_signature(example, model.predict(example, verbose=0))
    info = mlflow.models.Model.log(
        artifact_path=None, name="model", flavor=_KerasFlavor, model=model, signature=signature, input_example=example,
        metadata=metadata, pip_requirements=pip_requirements(),
    )
    # MLflow 3: register the LoggedModel's URI, not runs:/<id>/model.
    registered = mlflow.register_model(info.model_uri, model_name)
    return info.model_uri, str(registered.version)


def promote(client, model_name: str, version_id: str, alias: str, metrics: dict, min_sensitivity: float,
            settle_seconds: float = 1.0, rounds: int = 3) -> PromotionDecision:
    """Tag the version with its metrics, then apply the gate against the champion of now.

    The registry has no compare-and-set, so two runs finishing together could
    both read the old champion and both take the alias. After promoting, each
    waits briefly and re-reads the alias: a run holding a higher test AUC than
    the version that took the alias after it takes it back. Every racer ends on
    the same answer, the best of the versions that passed the gate.
    """
    for key in ("test_auc", "test_sensitivity", "test_specificity", "test_accuracy", "threshold"):
        client.set_model_version_tag(model_name, version_id, key, str(metrics[key]))
    champion_version, champion_auc = current_champion(client, model_name, alias)
    decision = decide(metrics["test_auc"], metrics["test_sensitivity"], min_sensitivity, champion_version, champion_auc)
    client.set_model_version_tag(model_name, version_id, "promotion_decision", "promoted" if decision.promoted else "rejected")
    client.set_model_version_tag(model_name, version_id, "promotion_reason", decision.reason)
    if decision.promoted:
        client.set_registered_model_alias(model_name, alias, version_id)
        for _ in range(rounds):
            time.sleep(settle_seconds)
            holder, holder_auc = current_champion(client, model_name, alias)
            if holder == version_id or (holder_auc is not None and holder_auc >= metrics["test_auc"]):
                break
            client.set_registered_model_alias(model_name, alias, version_id)
    return decision
