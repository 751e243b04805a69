"""Steps of the batch inference and monitoring pipelines: a registered version + images in, predictions out.

Nothing large passes through the artifact store: the model is loaded from the MLflow registry by its pinned version
(recorded as metadata), images are streamed from their source, and batch inference writes its predictions to the
output it was given; only a summary is stored. Monitoring keeps its batch's table and features for the drift test.
"""

import logging
from typing import Annotated, Optional, Tuple

import mlflow
import pandas as pd
from PIL import Image
from zenml import log_metadata, step
from zenml.client import Client
from zenml.io import fileio

from steps.tracking import log_config, mlflow_run
from xray.config import ArchiveLimits, InferenceConfig, RegistryConfig
from xray.evaluation import plots
from xray.monitoring import ood
from xray.monitoring import prediction_log as prediction_log_module
from xray.registry import store
from xray.serving import batch, sr
from xray.serving.explain import explanation_caption, explanation_name, read_chosen
from xray.storage import listing

logger = logging.getLogger(__name__)


# Not cached: an alias such as champion can move between runs.
@step(enable_cache=False, experiment_tracker=True)
def resolve_model_version(model_version: str, registry: RegistryConfig) -> Annotated[dict, "model_info"]:
    """Pin an alias such as champion to its version number, so every step of this run uses the same version."""
    info = store.resolve_version(registry.model_name, model_version)
    logger.info("using %s (%s)", info["uri"], model_version)
    return info


class ArtifactStoreFiles:
    """The prediction log's parts through ZenML's fileio: the artifact store's own endpoint and credentials."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def write(self, relative: str, data: bytes) -> None:
        path = f"{self.root}/{relative}"
        fileio.makedirs(path.rsplit("/", 1)[0])
        with fileio.open(path, "wb") as handle:
            handle.write(data)

    def list(self) -> list[str]:
        if not fileio.exists(self.root):
            return []
        found = fileio.glob(f"{self.root}/date=*/*.parquet")
        return sorted(str(path)[str(path).rindex("date=") :] for path in found)

    def read(self, relative: str) -> bytes:
        with fileio.open(f"{self.root}/{relative}", "rb") as handle:
            return handle.read()


def log_store(setting: str) -> tuple[str, object] | None:
    """monitoring.prediction_log resolved to (root, store): artifact-store is <the active stack's artifact
    store>/prediction_log, written through ZenML; a folder or an s3:// prefix is written directly; off is None."""
    if setting == prediction_log_module.OFF:
        return None
    if setting == "artifact-store":
        root = Client().active_stack.artifact_store.path.rstrip("/") + "/prediction_log"
        return root, ArtifactStoreFiles(root)
    return setting, prediction_log_module.open_store(setting)


def prediction_log(setting: str, images: str) -> prediction_log_module.PredictionLog | None:
    resolved = log_store(setting)
    if resolved is None:
        return None
    root, store = resolved
    logger.info("logging every prediction to %s", prediction_log_module.without_credentials(root))
    return prediction_log_module.PredictionLog(root, "batch", images, store=store)


def _load(model_info: dict, registry: RegistryConfig, runtime: str | None = None):
    """The version's predictor, on ``runtime`` (inference.runtime) where given; Grad-CAM keeps the Keras model."""
    predictor, _ = store.load_predictor(registry.model_name, model_info["version"])
    if runtime is not None:
        predictor.use_runtime(runtime)
    log_metadata(metadata={"model_uri": model_info["uri"], "model_version": model_info["version"]})
    return predictor


@step(enable_cache=False, experiment_tracker=True)
def predict_batch(
    model_info: dict,
    images: str,
    output: str,
    resume: bool,
    inference: InferenceConfig,
    registry: RegistryConfig,
    limits: ArchiveLimits = ArchiveLimits(),
    s3_max_attempts: int = 5,
    explain: int = 0,
    write_back: bool = False,
    site: Optional[str] = None,
    log_to: str = prediction_log_module.OFF,
    shard: int = 0,
    shards: int = 1,
) -> Tuple[Annotated[dict, "prediction_summary"], Annotated[list, "to_explain"]]:
    """Stream every image of ``images`` through the version and write one row per image to ``output``; with
            ``explain``, also the rows most worth a Grad-CAM look (xray.serving.explain.choose_to_explain); with
            ``write_back``, one DICOM SR per analysed image into the PACS the images came from (xray.serving.sr); every row
        also to the prediction log ``log_to`` (monitoring.prediction_log). With ``shards`` > 1, only share ``shard`` of
    the listing (xray.serving.batch.shard_of), into its own part beside ``output``."""
    predictor = _load(model_info, registry, inference.runtime)
    point, threshold, _ = predictor.operating_point(site)  # an unknown site fails before any image is read
    predictor.site = site
    reports = (
        sr.ReportWriter(images, registry.model_name, model_info["version"], s3_max_attempts, inference.pacs)
        if write_back
        else None
    )
    log = prediction_log(log_to, images)
    output = batch.shard_output(output, shard, shards)
    with batch.PredictionWriter(output, resume, s3_max_attempts, log=log) as writer:
        result = batch.predict_source(
            predictor,
            images,
            inference,
            writer,
            limits=limits,
            max_attempts=s3_max_attempts,
            explain=explain,
            on_batch=reports.write if reports else None,
            shard=(shard, shards),
        )
    summary = result.summary() | {
        "output": output,
        "rows_written": writer.rows,
        "site": site or "",
        "operating_point": point,
        "threshold": threshold,
        "prediction_log_rows": log.written if log is not None else 0,
        "prediction_log_caught_up": writer.caught_up,
        "runtime": predictor.runtime,
    }
    if reports is not None:
        summary |= reports.summary()
    logger.info("predicted %s: %s", images, summary)
    # Shards share the pipeline's MLflow run: each logs under its own prefix.
    prefix = f"shard_{shard}." if shards > 1 else ""
    with mlflow_run():
        log_config(inference=inference)
        mlflow.log_params(
            {
                f"{prefix}{key}": value
                for key, value in {
                    "model_uri": model_info["uri"],
                    "model_version": model_info["version"],
                    "images": images,
                    "output": output,
                    "resume": resume,
                    "write_back": write_back,
                    "site": site or "",
                    "operating_point": point,
                    "threshold": model_info["threshold"],
                    "image_size": model_info["image_size"],
                    "runtime": predictor.runtime,
                }.items()
            }
        )
        metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}
        metrics |= {f"predicted_{label.lower()}": count for label, count in result.predicted.items()}
        mlflow.log_metrics({f"{prefix}{key}": value for key, value in metrics.items()})
    return summary, result.to_explain


@step(enable_cache=False)
def merge_predictions(output: str, shards: int, s3_max_attempts: int = 5) -> Annotated[dict, "merged_predictions"]:
    """The shards' parts as one output (the parts stay: a rerun with --resume reads them)."""
    parts = [batch.shard_output(output, shard, shards) for shard in range(shards)]
    rows = batch.merge_outputs(parts, output, s3_max_attempts)
    logger.info("merged %d shards into %s: %d rows", shards, output, rows)
    return {"output": output, "rows_written": rows, "parts": parts}


@step(enable_cache=False, experiment_tracker=True)
def score_batch(
    model_info: dict,
    images: str,
    inference: InferenceConfig,
    registry: RegistryConfig,
    limits: ArchiveLimits = ArchiveLimits(),
    s3_max_attempts: int = 5,
) -> Tuple[
    Annotated[pd.DataFrame, "predictions"],
    Annotated[pd.DataFrame, "image_features"],
    Annotated[dict, "ood_examples"],
]:
    """Monitoring: the batch's predictions, out-of-distribution features and its most unusual images."""
    predictor = _load(model_info, registry, inference.runtime)
    result = batch.predict_source(
        predictor, images, inference, limits=limits, max_attempts=s3_max_attempts, keep=True, examples=8
    )
    logger.info("scored %s: %s", images, result.summary())
    examples = {name: picture for _, name, picture in result.examples}
    return result.table, ood.feature_table(result.features, predictor.profile), examples


@step(enable_cache=False, experiment_tracker=True)
def explain_predictions(
    model_info: dict,
    to_explain: list,
    images: str,
    registry: RegistryConfig,
    limits: ArchiveLimits = ArchiveLimits(),
    s3_max_attempts: int = 5,
) -> Annotated[dict, "gradcam"]:
    """Grad-CAM (last conv block of the backbone) of the chosen rows: the most confident PNEUMONIA calls and those
    nearest the threshold, each captioned with its probability, threshold and status, with a colour bar."""
    if not to_explain:
        return {}
    names = {row["path"] for row in to_explain}
    found = read_chosen(listing.list_images(images, limits, max_attempts=s3_max_attempts), names)
    predictor = _load(model_info, registry)
    rows = [row for row in to_explain if row["path"] in found]
    encoded = [predictor.prepare(found[row["path"]]).encoded for row in rows]
    pictures = plots.explanations(
        predictor.model,
        encoded,
        predictor.image_size,
        predictor.threshold,
        [explanation_caption(r) for r in rows],
    )
    overlays: dict[str, Image.Image] = {
        explanation_name(rank, row): picture for rank, (row, picture) in enumerate(zip(rows, pictures), 1)
    }
    logger.info("Grad-CAM of %d images: %s", len(overlays), {row["path"]: row["why"] for row in rows})
    with mlflow_run():
        for name, overlay in overlays.items():
            mlflow.log_image(overlay, f"gradcam/{name}")
    return overlays
