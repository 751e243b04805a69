"""Steps of the batch inference pipeline: a registered version + images in, predictions out.

Nothing large passes through the artifact store: the model is loaded from the MLflow registry by its pinned version
(recorded as metadata), images are streamed from their source, and batch inference writes its predictions to the
output it was given; only a summary is stored.
"""

import logging
from typing import Annotated

import mlflow
from zenml import step

from materializers import FiguresMaterializer
from steps.logstore import audit_trail, prediction_log
from steps.records import BatchPrediction, MergedPredictions
from steps.tracking import log_config, mlflow_run
from steps.version import load
from xray.evaluation import plots
from xray.model import gradcam
from xray.registry.control import audit
from xray.registry.store import ModelInfo
from xray.requests import InferenceRequest
from xray.serving import batch, sr
from xray.serving.explain import explanation_caption, explanation_name, read_chosen
from xray.storage import listing

logger = logging.getLogger(__name__)


@step(enable_cache=False, experiment_tracker=True)
def predict_batch(
    model_info: ModelInfo, request: InferenceRequest, shard: int = 0
) -> Annotated[BatchPrediction, "prediction"]:
    """Stream every image of the request through the version and write one row per image to its output; with
    ``explain``, also choose the rows most worth a Grad-CAM look (xray.serving.explain.choose_to_explain); with
    ``write_back``, one DICOM report per analysed image into the PACS the images came from (xray.serving.sr) and, with
    ``heatmaps``, each ``ok`` image's Grad-CAM as a Segmentation and a Secondary Capture beside it; every
    row also to the prediction log (monitoring.prediction_log). With ``shards`` > 1, only share ``shard`` of the
    listing (xray.serving.batch.shard_of), into its own part beside the output."""
    config = request.config
    predictor = load(model_info, config.registry.model_name, config.inference.runtime)
    point, threshold, _ = predictor.operating_point(request.site)  # an unknown site fails before any image is read
    predictor.site = request.site
    attempts = config.s3.max_attempts
    reports = (
        sr.ReportWriter(
            request.images,
            config.registry.model_name,
            model_info.version,
            attempts,
            config.inference.pacs,
            heatmaps=request.heatmaps,
            predictor=predictor,
        )
        if request.write_back
        else None
    )
    log = prediction_log(config.monitoring.prediction_log, request.images)
    output = batch.shard_output(request.output, shard, request.shards)
    with batch.PredictionWriter(output, request.resume, attempts, log=log) as writer:
        result = batch.predict_source(
            predictor,
            request.images,
            config.inference,
            writer,
            limits=config.data.limits,
            max_attempts=attempts,
            wanted=batch.Wanted(explain=request.explain, on_batch=reports.write if reports else None),
            shard=(shard, request.shards),
        )
    summary = result.summary() | {
        "output": output,
        "rows_written": writer.rows,
        "site": request.site or "",
        "operating_point": point,
        "threshold": threshold,
        "prediction_log_rows": log.written if log is not None else 0,
        "prediction_log_caught_up": writer.caught_up,
        "runtime": predictor.runtime,
    }
    if reports is not None:
        summary |= reports.summary()
        # The trail holds counts and the version, never a UID or anything else of a patient.
        counts = {key: value for key, value in reports.summary().items() if isinstance(value, int)}
        about = {"model_name": config.registry.model_name, "model_version": model_info.version, "shard": shard}
        who = audit.account(config.registry.tracking_uri)
        audit_trail().append("write-back batch", who, "batch inference --write-back to the PACS", about | counts)
    logger.info("predicted %s: %s", request.images, summary)
    # Shards share the pipeline's MLflow run: each logs under its own prefix.
    prefix = f"shard_{shard}." if request.shards > 1 else ""
    with mlflow_run():
        log_config(inference=config.inference)
        params: dict[str, object] = {
            "model_uri": model_info.uri,
            "model_version": model_info.version,
            "images": request.images,
        }
        params |= {"output": output, "resume": request.resume, "write_back": request.write_back}
        params |= {"heatmaps": request.heatmaps}
        params |= {"site": request.site or "", "operating_point": point, "threshold": model_info.threshold}
        params |= {"image_size": model_info.image_size, "runtime": predictor.runtime}
        mlflow.log_params({f"{prefix}{key}": value for key, value in params.items()})
        metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}
        metrics |= {f"predicted_{label.lower()}": count for label, count in result.predicted.items()}
        mlflow.log_metrics({f"{prefix}{key}": value for key, value in metrics.items()})
    return BatchPrediction(summary, result.to_explain)


@step(enable_cache=False)
def merge_predictions(request: InferenceRequest) -> Annotated[MergedPredictions, "merged_predictions"]:
    """The shards' parts as one output (the parts stay: a rerun with --resume reads them)."""
    parts = [batch.shard_output(request.output, shard, request.shards) for shard in range(request.shards)]
    rows = batch.merge_outputs(parts, request.output, request.config.s3.max_attempts)
    logger.info("merged %d shards into %s: %d rows", request.shards, request.output, rows)
    return MergedPredictions(request.output, rows, parts)


@step(enable_cache=False, experiment_tracker=True, output_materializers={"gradcam": FiguresMaterializer})
def explain_predictions(
    model_info: ModelInfo, prediction: BatchPrediction, request: InferenceRequest
) -> Annotated[plots.Figures, "gradcam"]:
    """Grad-CAM (last conv block of the backbone) of the chosen rows: the most confident PNEUMONIA calls and those
    nearest the threshold, each captioned with its probability, threshold and status, with a colour bar."""
    chosen, config = prediction.to_explain, request.config
    if not chosen:
        return plots.Figures()
    refs = listing.list_images(request.images, config.data.limits, max_attempts=config.s3.max_attempts)
    found = read_chosen(refs, {row["path"] for row in chosen})
    predictor = load(model_info, config.registry.model_name)
    rows = [row for row in chosen if row["path"] in found]
    encoded = [predictor.prepare(found[row["path"]]).encoded for row in rows]
    captions = [explanation_caption(row) for row in rows]
    pictures = gradcam.explanations(predictor.model, encoded, predictor.image_size, predictor.threshold, captions)
    overlays = {explanation_name(rank, row): picture for rank, (row, picture) in enumerate(zip(rows, pictures), 1)}
    logger.info("Grad-CAM of %d images: %s", len(overlays), {row["path"]: row["why"] for row in rows})
    with mlflow_run():
        for name, overlay in overlays.items():
            mlflow.log_image(overlay, f"gradcam/{name}")
    return plots.Figures(overlays)
