"""Batch inference: a registered version + images -> predictions written to the output, with out-of-distribution
checks (+ Grad-CAM, + reports written back to a PACS); its launch and its summary."""

from zenml import pipeline
from zenml.enums import ExecutionMode

from pipelines import launch
from steps.predict import explain_predictions, merge_predictions, predict_batch
from steps.tracking import mark_run_failed
from steps.version import resolve_model_version
from xray.requests import InferenceRequest
from xray.serving import batch


@pipeline(name="chest_xray_inference", execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def inference_pipeline(request: InferenceRequest) -> None:
    model_info = resolve_model_version(model_version=request.model_version, registry=request.config.registry)
    # With shards, N predict steps (each its own job on a remote orchestrator), then one merge.
    names = [f"predict_batch_{shard}" for shard in range(request.shards)] if request.shards > 1 else ["predict_batch"]
    for shard, name in enumerate(names):
        prediction = predict_batch(model_info, request=request, shard=shard, id=name)
    if request.shards > 1:
        merge_predictions(request=request, after=names)
    elif request.explain:
        explain_predictions(model_info, prediction, request=request)


def run_inference(request: InferenceRequest) -> dict:
    """``infer``: predictions streamed into the request's output (.csv or .parquet, a path or s3://)."""
    experiment = request.config.inference.experiment_name
    return launch.launch(inference_pipeline, request, experiment, lambda run, load: summarize(load, request))


def summarize(load, request: InferenceRequest) -> dict:
    """The summary line; the Grad-CAM overlays are written beside a local output (else under outputs/)."""
    if request.shards > 1:
        merged = load("merge_predictions", "merged_predictions")
        parts = [load(f"predict_batch_{shard}", "prediction").summary for shard in range(request.shards)]
        summary = batch.combine_summaries(parts) | {"output": merged.output, "rows_written": merged.rows_written}
        summary |= {"shards": request.shards, "parts": merged.parts}
    else:
        summary = load("predict_batch", "prediction").summary
    overlays = load("explain_predictions", "gradcam").images if request.explain else {}
    folder = request.gradcam_folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in overlays.items():
        image.save(folder / name)
    info = load("resolve_model_version", "model_info")
    return summary | {
        "model_uri": info.uri,
        "model_version": info.version,
        "threshold": summary.get("threshold", info.threshold),
        "gradcam": sorted(str(folder / name) for name in overlays),
    }
