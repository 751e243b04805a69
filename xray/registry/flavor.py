"""How a version is written to MLflow: the Keras flavor with this project's serving flavor and card in one model
folder, its signature and input example, its pinned requirements; logging and registering it, and stamping its
number into the folder once the registry has given it one."""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from xray.config import ScopeConfig
from xray.registry.store import logged_model_id, model_uri
from xray.serving import bundle
from xray.serving.predictor import OUTPUT_COLUMNS

# TensorFlow installs under several distribution names: tensorflow-cpu here, tensorflow on the GPU image.
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tensorflow-intel")
# scikit-learn and scipy: the reference profile scores every request (xray.ood).
RUNTIME_DISTRIBUTIONS = ("keras", "mlflow", "pillow", "numpy", "scikit-learn", "scipy")


def pip_requirements(installed=version) -> list[str]:
    """Pinned from what is installed, TensorFlow under whichever name it was installed; MLflow's inference would
    load TF in a subprocess. ``installed``: distribution name -> version, raising PackageNotFoundError."""

    def pin(name: str) -> str | None:
        try:
            return f"{name}=={installed(name)}"
        except PackageNotFoundError:
            return None

    tensorflow = next(filter(None, map(pin, TENSORFLOW_DISTRIBUTIONS)), None)
    if tensorflow is None:
        raise RuntimeError(
            f"no TensorFlow distribution installed (looked for {', '.join(TENSORFLOW_DISTRIBUTIONS)}): "
            "the registered model would have no TensorFlow requirement"
        )
    pins = [tensorflow]
    for name in RUNTIME_DISTRIBUTIONS:
        pinned = pin(name)
        if pinned is None:
            raise RuntimeError(f"{name} is not installed, but the registered model needs it at inference")
        pins.append(pinned)
    return pins


class _KerasFlavor:
    """mlflow.keras, plus this project's serving flavor and model card in the same model directory.

    - mlflow 3.17's keras ``save_model`` writes ``input_example.json`` into a
      directory it only creates afterwards, and accepts only tensor signatures;
      the signature and input example here describe the serving interface
      (base64 image strings), so they are added after the Keras flavor is saved.
    - The ``python_function`` flavor is pointed at :mod:`xray.serving.pyfunc` (the
      package is shipped in the model's ``code/``; :mod:`xray.serving.bundle`), so
      ``mlflow models serve`` takes image bytes and applies the recorded
      preprocessing and threshold, while ``mlflow.keras.load_model`` still returns
      the Keras model.
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(
        path, mlflow_model, serving: dict, model_card: str, signature, input_example, reference_profile, **kwargs
    ):
        import mlflow.keras  # lazy: MLflow's import costs seconds, and only registration needs it here
        from mlflow.models.utils import _save_example  # lazy: as above; what MLflow's own flavors call

        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        mlflow_model.signature = signature
        _save_example(mlflow_model, input_example, path)
        mlflow_model.flavors["python_function"].update(bundle.write(path, serving, reference_profile))
        mlflow_model.save(os.path.join(path, "MLmodel"))
        Path(path, "model_card.md").write_text(model_card)


def serving_signature():
    from mlflow.models import ModelSignature  # lazy: MLflow's import takes seconds
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema  # lazy: MLflow's import takes seconds

    kinds = {"probability": "double", "threshold": "double", "ood_score": "double"}
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec(kinds.get(name, "string"), name) for name in OUTPUT_COLUMNS]),
        # A request's site (its own operating point); empty: the version's.
        params=ParamSchema([ParamSpec("site", "string", "")]),
    )


def example_request() -> pd.DataFrame:
    """A real (synthetic, gray) JPEG, base64-encoded, as the serving input example."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, dtype=np.uint8)).convert("RGB").save(buffer, format="JPEG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]})


def log_and_register(model, model_name: str, metadata: dict, model_card: str, reference_profile) -> tuple[str, str]:
    """Log the model (Keras + serving flavors, card, reference profile) to the active run and register it.

    Returns (uri, version).
    """
    import mlflow  # lazy: MLflow's import takes seconds

    serving = {
        "threshold": metadata["threshold"],
        "image_size": metadata["image_size"],
        "preprocessing": metadata["preprocessing"],
        "scope": metadata.get("scope") or ScopeConfig().model_dump(mode="json"),
        "operating_points": metadata.get("operating_points") or {},
    }
    info = mlflow.models.Model.log(
        artifact_path=None,
        name="model",
        flavor=_KerasFlavor,
        model=model,
        signature=serving_signature(),
        input_example=example_request(),
        metadata=metadata,
        pip_requirements=pip_requirements(),
        serving=serving,
        model_card=model_card,
        reference_profile=reference_profile,
    )
    # MLflow 3: register the LoggedModel's URI, not runs:/<id>/model.
    registered = mlflow.register_model(info.model_uri, model_name)
    return info.model_uri, str(registered.version)


def stamp_version(client, model_name: str, version: str) -> None:
    """Write the registered version's number into its ``data/serving.json``, so that every answer of a server that
    loads the folder names the version (the number exists only once the logged model is registered)."""
    import mlflow  # lazy: MLflow's import takes seconds

    model_id = logged_model_id(client.get_model_version(model_name, version))
    with tempfile.TemporaryDirectory(prefix="xray-serving-") as folder:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{model_uri(model_name, str(version))}/{bundle.DATA_DIR}/{bundle.CONFIG_FILE}",
                dst_path=folder,
            )
        )
        local.write_text(json.dumps(json.loads(local.read_text()) | {"version": str(version), "model": model_name}))
        client.log_model_artifact(model_id, str(local), artifact_path=bundle.DATA_DIR)
