"""Timed ZenML runs for cached_rerun_speedup; run by bench.py in a child process with isolated stores.

.venv/bin/python benchmarks/zenml_runs.py ARCHIVE OUT.json
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from xray.environment import apply_defaults  # noqa: E402

apply_defaults()

from zenml import pipeline  # noqa: E402
from zenml.client import Client  # noqa: E402

from pipelines.training import training_pipeline  # noqa: E402
from steps import build_datasets, ingest_from_s3, locate_archive, unzip_and_validate  # noqa: E402
from xray.config_file import load_config  # noqa: E402
from xray.requests import TrainingRequest  # noqa: E402
from xray.storage import s3  # noqa: E402


@pipeline(name="xray_data_steps_benchmark")
def data_steps(config, dataset_uri: str) -> None:
    identity = locate_archive(dataset_uri=dataset_uri, s3=config.s3)
    raw_archive = ingest_from_s3(identity, s3=config.s3)
    dataset, _, _ = unzip_and_validate(raw_archive, data=config.data, seed=config.seed)
    build_datasets(dataset, data=config.data, model=config.model, train=config.train, seed=config.seed)


def timed(run_pipeline):
    start = time.perf_counter()
    run = run_pipeline()
    wall = time.perf_counter() - start
    run = Client().get_pipeline_run(run.id)
    steps = {
        name: {
            "status": step.status.value,
            "seconds": (step.end_time - step.start_time).total_seconds() if step.end_time else None,
        }
        for name, step in run.steps.items()
    }
    return wall, steps


def main(archive: Path, out: Path) -> None:
    config = load_config(ROOT / "configs" / "training_local.yaml")
    smoke = load_config(ROOT / "configs" / "training_smoke.yaml")
    with s3.EmbeddedS3():
        location = s3.S3Location(config.s3.bucket, config.s3.key)
        s3.upload_if_missing(s3.make_client(), archive, location)
        first, first_steps = timed(lambda: data_steps(config=config, dataset_uri=location.uri))
        cached, cached_steps = timed(lambda: data_steps(config=config, dataset_uri=location.uri))
        smoke_wall, smoke_steps = timed(
            lambda: training_pipeline.with_options(enable_cache=False)(
                request=TrainingRequest(config=smoke, dataset_uri=location.uri)
            )
        )
    inside = sum(step["seconds"] for step in smoke_steps.values())
    out.write_text(
        json.dumps(
            {
                "first_data_seconds": first,
                "cached_data_seconds": cached,
                "first_steps": first_steps,
                "cached_steps": cached_steps,
                "smoke_wall_seconds": smoke_wall,
                "smoke_step_seconds": inside,
                "smoke_orchestration_overhead_seconds": smoke_wall - inside,
                "smoke_steps": smoke_steps,
                "note": "step seconds are ZenML step-run start to end (function plus artifact loading and saving); "
                "the overhead is the rest of the wall time: run setup, caching checks, MLflow-independent bookkeeping",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
