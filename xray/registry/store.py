"""The model registry's I/O in MLflow: log and register a version, read and move aliases under the promotion lock,
load a version as a predictor, tag versions, update their model card. Knows nothing of how promotion decides
(:mod:`xray.registry.gate`); the workflow that combines the two is :mod:`xray.registry.promotion`."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from xray.config import ScopeConfig
from xray.errors import ConfigError
from xray.monitoring.ood import ReferenceProfile
from xray.registry.card import SITE_SECTION, description, site_table, site_tag, with_history
from xray.serving import bundle
from xray.serving.predictor import OUTPUT_COLUMNS

logger = logging.getLogger(__name__)

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


def current_champion(client, model_name: str, alias: str) -> tuple[str | None, float | None]:
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds

    try:
        champion = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None, None
    auc = champion.tags.get("test_auc")
    return str(champion.version), (float(auc) if auc is not None else None)


def versions_test_auc(client, model_name: str, versions) -> dict[str, float]:
    """The recorded test AUC of each version that has one (the ``test_auc`` tag set at registration)."""
    found = {}
    for number in sorted({str(v) for v in versions}):
        auc = client.get_model_version(model_name, number).tags.get("test_auc")
        if auc is not None:
            found[number] = float(auc)
    return found


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


def set_version_tags(client, model_name: str, version: str, tags: dict) -> None:
    """Every tag of ``tags`` on the version, floats to 6 significant digits, anything else as its text."""
    for key, value in tags.items():
        client.set_model_version_tag(
            model_name, version, key, f"{value:.6g}" if isinstance(value, float) else str(value)
        )


def move_alias_if(client, model_name: str, alias: str, version: str, expected: str | None) -> str | None:
    """Under :func:`promotion_lock`: give ``version`` the alias if its holder is still ``expected`` (None: no holder);
    return the holder found. The registry has no compare-and-set; the lock provides one."""
    with promotion_lock(client, model_name):
        holder, _ = current_champion(client, model_name, alias)
        if holder == expected:
            client.set_registered_model_alias(model_name, alias, version)
        return holder


LOCK_SUFFIX = ".promotion-lock"


@contextmanager
def promotion_lock(client, model_name: str, timeout_s: float = 300.0, stale_s: float = 1800.0, poll_s: float = 0.2):
    """A mutex over the promotions of one model, in the registry itself so that it holds across machines and any
    MLflow backend: creating a registered model is atomic (RESOURCE_ALREADY_EXISTS for the second creator), so the
    holder is whoever created ``<model>.promotion-lock``; it is deleted on release. A lock older than ``stale_s``
    (its holder died) is broken with a warning."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds

    name = model_name + LOCK_SUFFIX
    deadline = time.monotonic() + timeout_s
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    while True:
        try:
            client.create_registered_model(name, description=f"promotion lock held by {holder}; deleted on release")
            break
        except MlflowException as error:
            # RESOURCE_DOES_NOT_EXIST: MLflow's SQL store answers a lost insert race by reading the winner's row,
            # which the winner may already have deleted (taken and released in between): contended, try again.
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(name)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue  # released between the two calls
            raise
        age = time.time() - held.creation_timestamp / 1000
        if age > stale_s:
            logger.warning("breaking the promotion lock %s, %.0f s old (%s)", name, age, held.description)
            _delete_model(client, name)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"promotion lock {name} still held after {timeout_s:.0f} s ({held.description})")
        time.sleep(poll_s)
    try:
        yield
    finally:
        _delete_model(client, name)


def _delete_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds

    try:
        client.delete_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def model_uri(model_name: str, version_or_alias: str) -> str:
    return (
        f"models:/{model_name}/{version_or_alias}"
        if version_or_alias.isdigit()
        else f"models:/{model_name}@{version_or_alias}"
    )


def resolve_version(model_name: str, version_or_alias: str) -> dict:
    """The version behind a number or an alias, pinned: uri ``models:/<name>/<number>``, threshold, image size."""
    import mlflow  # lazy: MLflow's import takes seconds
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds

    uri = model_uri(model_name, version_or_alias)
    client = mlflow.tracking.MlflowClient()
    try:
        version = (
            client.get_model_version(model_name, version_or_alias)
            if version_or_alias.isdigit()
            else client.get_model_version_by_alias(model_name, version_or_alias)
        )
    except MlflowException:
        raise ConfigError(f"no model version {uri} in the registry at {mlflow.get_tracking_uri()}") from None
    pinned = model_uri(model_name, str(version.version))
    # Not mlflow.models.get_model_info: from a remote artifact store it downloads MLmodel into a folder it never
    # removes, one per call.
    with tempfile.TemporaryDirectory(prefix="xray-mlmodel-") as folder:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{pinned}/MLmodel", dst_path=folder)
        metadata = mlflow.models.Model.load(local).metadata or {}
    return {
        "uri": pinned,
        "requested": version_or_alias,
        "version": str(version.version),
        "threshold": float(metadata["threshold"]),
        "image_size": int(metadata["image_size"]),
    }


def load_predictor(model_name: str, version_or_alias: str):
    """(ChestXrayPredictor, info) for ``champion`` or a version number: the model folder as registered.

    The Keras model, threshold, image size and reference profile come from the one folder that
    serving loads too, so batch inference, monitoring and serving cannot disagree.
    """
    import mlflow  # lazy: MLflow's import takes seconds

    info = resolve_version(model_name, version_or_alias)
    # The folder is read whole into memory (Keras model, profile arrays): nothing refers to it afterwards.
    with tempfile.TemporaryDirectory(prefix="xray-model-") as folder:
        local = mlflow.artifacts.download_artifacts(artifact_uri=info["uri"], dst_path=folder)
        predictor = bundle.read(os.path.join(local, bundle.DATA_DIR))
    predictor.version = info["version"]
    return predictor, info | {"has_reference_profile": predictor.profile is not None}


def load_reference_profile(model_name: str, version_or_alias: str):
    """(ReferenceProfile, info): only the profile folder of the version, not its model."""
    import mlflow  # lazy: MLflow's import takes seconds
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds

    info = resolve_version(model_name, version_or_alias)
    with tempfile.TemporaryDirectory(prefix="xray-profile-") as folder:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{info['uri']}/{bundle.DATA_DIR}/{bundle.PROFILE_DIR}", dst_path=folder
            )
        except MlflowException as error:
            if "No such artifact" not in str(error):
                raise
            raise ConfigError(
                f"{info['uri']} has no reference profile (registered before profiles existed): "
                "train and register a new version to monitor against it"
            ) from None
        return ReferenceProfile.load(local), info


def record_site_result(
    client, model_name: str, version: str, site: str, metrics: dict, run_id: str, recalibrated: dict | None = None
) -> None:
    """One version tag ``site.<site>`` (JSON: the source of the model card's table), newest run wins."""
    key, value = site_tag(site, metrics, run_id, recalibrated)
    set_version_tags(client, model_name, version, {key: value})


def card_uri(model_name: str, version: str) -> str:
    """Where the version's one model card is: its logged model's ``model_card.md``."""
    return f"{model_uri(model_name, str(version))}/model_card.md"


def publish_card(client, model_name: str, version: str, text: str) -> None:
    """The card as the version's description in the registry (what the MLflow UI shows on the version's page)."""
    client.update_model_version(model_name, version, description=description(text, card_uri(model_name, version)))


def logged_model_id(model_version) -> str:
    """The id of the MLflow 3 logged model behind a registered version (``model_id``, or its ``models:/m-...`` source:
    the SQL registry leaves ``model_id`` empty when a version is registered from the logged model's URI)."""
    if model_version.model_id:
        return model_version.model_id
    source = model_version.source or ""
    if source.startswith("models:/m-"):
        return source.removeprefix("models:/").split("/")[0]
    raise ValueError(
        f"{model_version.name} v{model_version.version} has no logged model (source {source!r}): "
        "registered before MLflow 3 logged models; its card cannot be updated"
    )


def save_operating_point(client, model_name: str, version: str, site: str, point: dict) -> None:
    """Store a site's re-fitted operating point with the version: ``operating_points.json`` in its logged model,
    beside ``data/`` (read by :func:`xray.serving.bundle.read`, so batch inference and serving use it), and the
    version tag ``operating_point.<site>``."""
    import mlflow  # lazy: MLflow's import takes seconds
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds

    model_id = logged_model_id(client.get_model_version(model_name, version))
    with tempfile.TemporaryDirectory(prefix="xray-points-") as folder:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{model_uri(model_name, version)}/{bundle.OPERATING_POINTS_FILE}", dst_path=folder
                )
            )
            points = json.loads(local.read_text())
        except MlflowException as error:
            if "No such artifact" not in str(error) and "not found" not in str(error).lower():
                raise
            local, points = Path(folder) / bundle.OPERATING_POINTS_FILE, {}
        points[site] = point
        local.write_text(json.dumps(points, indent=1))
        client.log_model_artifact(model_id, str(local))
    set_version_tags(client, model_name, version, {f"operating_point.{site}": json.dumps(point)})


def add_history(client, model_name: str, version: str, action: dict) -> None:
    """One action on a version (who, when, why): a version tag ``history.<UTC time>`` (JSON) and a line of the
    History section of its model card."""
    import mlflow  # lazy: MLflow's import takes seconds

    key = "".join(c for c in action["at"] if c.isdigit())
    set_version_tags(client, model_name, version, {f"history.{key}": json.dumps(action)})
    line = f"{action['at']} {action['action']} by {action['by']}: {action['why']}"
    model_id = logged_model_id(client.get_model_version(model_name, version))
    with tempfile.TemporaryDirectory(prefix="xray-card-") as folder:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=card_uri(model_name, version), dst_path=folder))
        card = with_history(local.read_text(), line)
        local.write_text(card)
        client.log_model_artifact(model_id, str(local))
    publish_card(client, model_name, version, card)


def alias_holder(client, model_name: str, alias: str) -> str | None:
    """The version an alias points to, None when it points nowhere."""
    holder, _ = current_champion(client, model_name, alias)
    return holder


def update_model_card(client, model_name: str, version: str) -> str:
    """Rewrite the "Results by site" section of the version's model_card.md (in its logged model's artifacts) from
    its tags; returns the new card."""
    import mlflow  # lazy: MLflow's import takes seconds

    model_version = client.get_model_version(model_name, version)
    model_id = logged_model_id(model_version)
    with tempfile.TemporaryDirectory(prefix="xray-card-") as folder:
        local = mlflow.artifacts.download_artifacts(artifact_uri=card_uri(model_name, version), dst_path=folder)
        card = Path(local).read_text()
        head = card.split(f"\n{SITE_SECTION}\n")[0].rstrip("\n")
        card = f"{head}\n\n{site_table(model_version.tags)}\n"
        Path(local).write_text(card)
        client.log_model_artifact(model_id, local)
    publish_card(client, model_name, version, card)
    return card
