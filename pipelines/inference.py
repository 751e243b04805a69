"""Wiring only: registered version + images -> predictions written to the output, with out-of-distribution checks
(+ Grad-CAM)."""

from pathlib import Path

from zenml import pipeline
from zenml.enums import ExecutionMode

from steps.predict import explain_predictions, merge_predictions, predict_batch, resolve_model_version
from steps.tracking import mark_run_failed
from xray.config import ArchiveLimits, InferenceConfig, RegistryConfig
from xray.serving import batch


@pipeline(name="chest_xray_inference", execution_mode=ExecutionMode.FAIL_FAST, on_failure=mark_run_failed)
def inference_pipeline(
    images: str,
    output: str,
    model_version: str,
    registry: RegistryConfig,
    inference: InferenceConfig,
    limits: ArchiveLimits,
    resume: bool = False,
    explain: int = 0,
    s3_max_attempts: int = 5,
    write_back: bool = False,
    site: str | None = None,
    prediction_log: str = "off",
    shards: int = 1,
) -> None:
    model_info = resolve_model_version(model_version=model_version, registry=registry)
    # With shards, N predict steps (each its own job on a remote orchestrator), then one merge.
    ids = [f"predict_batch_{shard}" for shard in range(shards)] if shards > 1 else ["predict_batch"]
    for shard, name in enumerate(ids):
        _, to_explain = predict_batch(
            model_info,
            images=images,
            output=output,
            resume=resume,
            inference=inference,
            registry=registry,
            limits=limits,
            s3_max_attempts=s3_max_attempts,
            explain=explain,
            write_back=write_back,
            site=site,
            log_to=prediction_log,
            shard=shard,
            shards=shards,
            id=name,
        )
    if shards > 1:
        merge_predictions(output=output, shards=shards, s3_max_attempts=s3_max_attempts, after=ids)
    elif explain:
        explain_predictions(
            model_info,
            to_explain,
            images=images,
            registry=registry,
            limits=limits,
            s3_max_attempts=s3_max_attempts,
        )


def summarize(load, folder: Path, explain: int, shards: int = 1) -> dict:
    """The summary line; the Grad-CAM overlays are written to ``folder``."""
    if shards > 1:
        merged = load("merge_predictions", "merged_predictions")
        parts = [load(f"predict_batch_{shard}", "prediction_summary") for shard in range(shards)]
        summary = batch.combine_summaries(parts) | {"output": merged["output"], "rows_written": merged["rows_written"]}
        summary |= {"shards": shards, "parts": merged["parts"]}
    else:
        summary = load("predict_batch", "prediction_summary")
    overlays = load("explain_predictions", "gradcam") if explain else {}
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in overlays.items():
        image.save(folder / name)
    info = load("resolve_model_version", "model_info")
    return summary | {
        "model_uri": info["uri"],
        "model_version": info["version"],
        "threshold": summary.get("threshold", info["threshold"]),
        "gradcam": sorted(str(folder / name) for name in overlays),
    }
