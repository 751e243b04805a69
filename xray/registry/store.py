"""The model registry's I/O in MLflow: read and move aliases under the promotion lock, seal a version's files and
log and register a version (its folder: xray.serving.bundle), load it as a predictor only as sealed, tag versions, update their model card. Knows nothing of how promotion decides
(:mod:`xray.registry.gate`); the workflow that combines the two is :mod:`xray.registry.promotion`."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from xray.config.scope import ScopeConfig
from xray.errors import ConfigError
from xray.monitoring.ood import ReferenceProfile
from xray.registry.card import SITE_SECTION, description, site_table, site_tag, with_history, with_int8, with_integrity
from xray.serving import bundle

logger = logging.getLogger(__name__)


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


@dataclass
class ModelInfo:
    """A registered version pinned (a ZenML artifact: every step of a run uses the same one): ``uri``
    ``models:/<name>/<number>``, what was asked for (a number or an alias), its number, the digest of its files
    recorded at registration (None for versions registered before digests), its threshold and image size."""

    uri: str
    requested: str
    version: str
    digest: str | None
    threshold: float
    image_size: int


def resolve_version(model_name: str, version_or_alias: str) -> ModelInfo:
    """The version behind a number or an alias, pinned: uri ``models:/<name>/<number>``, threshold, image size, and
    the digest of its files recorded at registration (None for versions registered before digests)."""
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
    info = ModelInfo(
        model_uri(model_name, str(version.version)),
        version_or_alias,
        str(version.version),
        version.tags.get(DIGEST_TAG),
        0.0,
        0,
    )
    # Not mlflow.models.get_model_info: from a remote artifact store it downloads MLmodel into a folder it never
    # removes, one per call.
    with tempfile.TemporaryDirectory(prefix="xray-mlmodel-") as folder:
        local = download_verified(info, "MLmodel", folder)
        metadata = mlflow.models.Model.load(local).metadata or {}
    return replace(info, threshold=float(metadata["threshold"]), image_size=int(metadata["image_size"]))


DIGEST_TAG = "model_sha256"
APPROVAL_TAG = "approval"
"""pending (passed the gate, waits for a reviewer), approved or rejected: xray.registry.decisions."""
_UNVERIFIED_WARNED: set[str] = set()


def download_verified(info: ModelInfo, relative: str, folder: str, quiet: bool = False) -> str:
    """Download the version's folder (``relative`` empty), a subfolder or a file of it into ``folder`` and check it
    against the digest recorded at registration (:func:`xray.serving.bundle.verify`); returns the local path."""
    import mlflow  # lazy: MLflow's import takes seconds
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{info.uri}/{relative}" if relative else info.uri, dst_path=os.path.join(folder, "files")
    )
    if info.digest is None:
        if info.uri not in _UNVERIFIED_WARNED and not quiet:
            _UNVERIFIED_WARNED.add(info.uri)
            logger.warning(
                "model version %s has no recorded digest (registered before digests): its files are not verified; "
                "register and approve a new version to have them checked",
                info.version,
            )
        return local
    try:
        listing = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{info.uri}/{bundle.MANIFEST_FILE}", dst_path=os.path.join(folder, "manifest")
            )
        ).read_text()
    except MlflowException:
        listing = ""  # no file list: verify() refuses, naming it
    prefix = relative + ("/" if relative and os.path.isdir(local) else "")
    bundle.verify(local, listing, info.digest, info.version, prefix)
    return local


def seal(client, model_name: str, version: str, card: str | None = None, changed: dict | None = None) -> str:
    """Record the digest of the version's files: ``files.sha256`` beside them, the tags ``model_sha256`` and
    ``card_sha256``, and the card's "Files" section (``card``, else the version's own). Registration seals once its
    folder is complete; a reviewer who changes files (``changed``: relative path -> bytes, a site's operating points)
    seals again, from the files as they were sealed (checked first: a file changed behind the registry's back is
    never sealed over). The list is checked against the folder before it is recorded. Returns the digest."""
    model_version = client.get_model_version(model_name, version)
    model_id = logged_model_id(model_version)
    digest = model_version.tags.get(DIGEST_TAG)
    info = ModelInfo(model_uri(model_name, version), str(version), str(version), digest, 0.0, 0)
    with tempfile.TemporaryDirectory(prefix="xray-seal-") as folder:
        local = Path(download_verified(info, "", folder, quiet=True))
        written = Path(folder) / "written"
        for relative, data in (changed or {}).items():
            for target in (local / relative, written / relative):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        listing = bundle.manifest(local)
        value = bundle.digest(listing)
        bundle.verify(local, listing, value, str(version))
        text = with_integrity(card if card is not None else verified_card(client, model_name, version, local), value)
        written.mkdir(exist_ok=True)
        (written / bundle.MANIFEST_FILE).write_text(listing)
        (written / bundle.CARD_FILE).write_text(text)
        # The files first: on a tracking server with accounts the tag seals the folder (infra/mlflow_auth.py).
        client.log_model_artifacts(model_id, str(written))
    # The card's hash before the digest: on a server with accounts the digest seals the version's record.
    set_version_tags(client, model_name, version, {CARD_TAG: bundle.digest(text), DIGEST_TAG: value})
    publish_card(client, model_name, version, text)
    return value


CARD_TAG = "card_sha256"


def verified_card(client, model_name: str, version: str, folder: Path | None = None) -> str:
    """The version's stored card, checked against the SHA-256 its last writer recorded (``card_sha256``): decisions
    append to the card, so it is not one of the digested files, but a card changed behind the registry's back is
    refused, never published."""
    import mlflow  # lazy: MLflow's import takes seconds

    if folder is None:
        with tempfile.TemporaryDirectory(prefix="xray-card-") as scratch:
            path = mlflow.artifacts.download_artifacts(artifact_uri=card_uri(model_name, version), dst_path=scratch)
            text = Path(path).read_text()
    else:
        text = (Path(folder) / bundle.CARD_FILE).read_text()
    expected = client.get_model_version(model_name, version).tags.get(CARD_TAG)
    if expected is not None and bundle.digest(text) != expected:
        raise bundle.ModelIntegrityError(
            f"model version {version} refused: its model card differs from the one last recorded ({CARD_TAG} "
            f"{expected[:12]}); it changed behind the registry's back"
        )
    return text


def load_predictor(model_name: str, version_or_alias: str):
    """(ChestXrayPredictor, info) for ``champion`` or a version number: the model folder as registered.

    The Keras model, threshold, image size and reference profile come from the one folder that
    serving loads too, so batch inference, monitoring and serving cannot disagree.
    """
    info = resolve_version(model_name, version_or_alias)
    # The folder is read whole into memory (Keras model, profile arrays): nothing refers to it afterwards.
    with tempfile.TemporaryDirectory(prefix="xray-model-") as folder:
        local = download_verified(info, "", folder)
        predictor = bundle.read(os.path.join(local, bundle.DATA_DIR))
    predictor.version = info.version
    return predictor, info


def load_reference_profile(model_name: str, version_or_alias: str):
    """(ReferenceProfile, info): only the profile folder of the version, not its model."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow's import takes seconds

    info = resolve_version(model_name, version_or_alias)
    with tempfile.TemporaryDirectory(prefix="xray-profile-") as folder:
        try:
            local = download_verified(info, f"{bundle.DATA_DIR}/{bundle.PROFILE_DIR}", folder)
        except MlflowException as error:
            if "No such artifact" not in str(error):
                raise
            raise ConfigError(
                f"{info.uri} has no reference profile (registered before profiles existed): "
                "train and register a new version to monitor against it"
            ) from None
        return ReferenceProfile.load(local), info


def load_operating_points(model_name: str, version: str) -> dict[str, dict]:
    """The version's sites' own operating points: those registered with it (its MLmodel metadata) and those a
    reviewer approved later (the ``operating_point.<site>`` tags :func:`save_operating_point` sets), without its model."""
    import mlflow  # lazy: MLflow's import takes seconds

    info = resolve_version(model_name, version)
    with tempfile.TemporaryDirectory(prefix="xray-mlmodel-") as folder:
        metadata = mlflow.models.Model.load(download_verified(info, "MLmodel", folder, quiet=True)).metadata or {}
    tags = mlflow.tracking.MlflowClient().get_model_version(model_name, info.version).tags
    later = {k.split(".", 1)[1]: json.loads(v) for k, v in tags.items() if k.startswith("operating_point.")}
    return dict(metadata.get("operating_points") or {}) | later


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
    version tag ``operating_point.<site>``; the version is sealed again (its files changed)."""
    info = resolve_version(model_name, version)
    with tempfile.TemporaryDirectory(prefix="xray-points-") as folder:
        local = Path(download_verified(info, "", folder))
        existing = local / bundle.OPERATING_POINTS_FILE
        points = json.loads(existing.read_text()) if existing.is_file() else {}
    points[site] = point
    changed = {bundle.OPERATING_POINTS_FILE: json.dumps(points, indent=1).encode()}
    set_version_tags(client, model_name, version, {f"operating_point.{site}": json.dumps(point)})
    seal(client, model_name, version, changed=changed)


def add_int8(client, model_name: str, version: str, outcome) -> str:
    """Store an int8 outcome made on request (xray.serving.runtimes.int8.Int8Outcome) with a registered version: its
    files in ``data/int8/`` (the model only where it passed its control), the tag ``int8``, the card's int8 line; the
    version is sealed again (its files changed). Returns the new digest."""
    with tempfile.TemporaryDirectory(prefix="xray-int8-") as folder:
        written = bundle.write_int8(folder, outcome).parent
        changed = {f"{bundle.DATA_DIR}/{bundle.INT8_DIR}/{p.name}": p.read_bytes() for p in written.iterdir()}
    update_model_card(client, model_name, version, lambda card: with_int8(card, outcome.card_line()))
    set_version_tags(client, model_name, version, {"int8": outcome.state})
    return seal(client, model_name, version, changed=changed)


def add_history(client, model_name: str, version: str, action: dict) -> None:
    """One action on a version (who, when, why): a version tag ``history.<UTC time>`` (JSON) and a line of the
    History section of its model card, whose site results are brought up to date with it."""
    key = "".join(c for c in action["at"] if c.isdigit())
    set_version_tags(client, model_name, version, {f"history.{key}": json.dumps(action)})
    line = f"{action['at']} {action['action']} by {action['by']}: {action['why']}"
    update_model_card(client, model_name, version, lambda card: with_history(card, line))


def alias_holder(client, model_name: str, alias: str) -> str | None:
    """The version an alias points to, None when it points nowhere."""
    holder, _ = current_champion(client, model_name, alias)
    return holder


def update_model_card(client, model_name: str, version: str, edit=lambda card: card) -> str:
    """Rewrite the "Results by site" section of the version's model_card.md (in its logged model's artifacts) from
    its tags, after ``edit`` (a History line), from the card as last recorded (:func:`verified_card`); the
    description and ``card_sha256`` follow. Returns the new card."""
    model_version = client.get_model_version(model_name, version)
    model_id = logged_model_id(model_version)
    card = edit(verified_card(client, model_name, version))
    head = card.split(f"\n{SITE_SECTION}\n")[0].rstrip("\n")
    card = f"{head}\n\n{site_table(model_version.tags)}\n"
    with tempfile.TemporaryDirectory(prefix="xray-card-") as folder:
        local = Path(folder) / bundle.CARD_FILE
        local.write_text(card)
        client.log_model_artifact(model_id, str(local))
    if CARD_TAG in model_version.tags:
        set_version_tags(client, model_name, version, {CARD_TAG: bundle.digest(card)})
    publish_card(client, model_name, version, card)
    return card


def log_and_register(
    files: bundle.VersionFiles, model_name: str, metadata: dict, model_card: str, tags: dict[str, str] | None = None
) -> tuple[str, str]:
    """Log the version's files (Keras + serving flavors, card, reference profile, int8) to the active run and register
    it, created with ``tags`` (one request, not one per tag). Returns (uri, version)."""
    import mlflow  # lazy: MLflow's import takes seconds

    serving = {key: metadata[key] for key in ("threshold", "image_size", "preprocessing")}
    serving["scope"] = metadata.get("scope") or ScopeConfig().model_dump(mode="json")
    serving["operating_points"] = metadata.get("operating_points") or {}
    info = mlflow.models.Model.log(
        artifact_path=None,
        name="model",
        flavor=bundle.KerasFlavor,
        model=files.model,
        signature=bundle.serving_signature(),
        input_example=bundle.example_request(),
        metadata=metadata,
        pip_requirements=bundle.pip_requirements(),
        serving=serving,
        model_card=model_card,
        files=files,
    )
    # MLflow 3: register the LoggedModel's URI, not runs:/<id>/model.
    registered = mlflow.register_model(info.model_uri, model_name, tags=tags)
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
