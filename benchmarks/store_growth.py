"""How much each run adds to each store, measured on the local stack with stores of its own (issue #18).

    .venv/bin/python benchmarks/store_growth.py [--config configs/training_smoke.yaml] [--images N]

Runs, in one fresh home: a training run, the same training run again (same archive object), a batch inference run
over N test images, and a second inference run over the same images; after each it measures the ZenML artifact store,
the ZenML database, the MLflow artifact root and the MLflow database (bytes on disk), and prints one JSON line with
the growth per run. The smoke config trains the same ResNet50V2 (the same number of weights, so the same model files)
on few images, but validates and stores the whole archive, as a full run does.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def stores(home: Path) -> dict[str, int]:
    stores = home / "zenml" / "local_stores"
    folders = [p for p in stores.iterdir() if p.is_dir()] if stores.exists() else []
    return {
        "zenml_artifact_store": sum(size(p) for p in folders if p.name != "default_zen_store"),
        "zenml_database": sum(size(p) for p in folders if p.name == "default_zen_store"),
        "mlflow_artifacts": size(home / "artifacts") if (home / "artifacts").exists() else 0,
        "mlflow_database": size(home / "mlflow.db") if (home / "mlflow.db").exists() else 0,
    }


@click.command()
@click.option("--config", "config", default="configs/training_smoke.yaml", show_default=True)
@click.option("--images", "count", default=100, show_default=True, help="Test images for the inference runs.")
def main(config: str, count: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="xray-stores-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "ZENML_"))} | {
        "ZENML_CONFIG_PATH": str(home / "zenml"),
        "ZENML_REPOSITORY_PATH": str(home),
        "ZENML_ANALYTICS_OPT_IN": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    images = home / "images"
    images.mkdir()
    with zipfile.ZipFile(ROOT.parent / "shared" / "data" / "chest_xray_224.zip") as archive:
        names = sorted(n for n in archive.namelist() if "/test/" in n and n.endswith(".jpeg"))[:count]
        for name in names:
            (images / Path(name).name).write_bytes(archive.read(name))

    def run(*args: str) -> dict:
        result = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), "-q", *args], cwd=home, env=env, capture_output=True, text=True
        )
        if result.returncode:
            raise click.ClickException(result.stderr[-3000:])
        return json.loads(result.stdout.strip().splitlines()[-1])

    def inference(output: str) -> tuple[str, ...]:
        # Version 1: a smoke model need not pass the gate's sensitivity floor to become champion.
        return (
            "--pipeline",
            "inference",
            "--model-version",
            "1",
            "--images",
            str(images),
            "--output",
            str(home / output),
        )

    steps = [
        ("training", ("--pipeline", "training", "--config", str(ROOT / config))),
        ("training, same archive", ("--pipeline", "training", "--config", str(ROOT / config))),
        ("inference", inference("p1.csv")),
        ("inference, again", inference("p2.csv")),
    ]
    before, growth = stores(home), {}
    for label, args in steps:
        summary = run(*args)
        after = stores(home)
        growth[label] = {key: after[key] - before[key] for key in after} | {
            "steps": summary.get("steps"),
        }
        print(label, json.dumps(growth[label]), file=sys.stderr, flush=True)
        before = after
    artifacts = {}
    for folder in (home / "zenml" / "local_stores").iterdir():
        if folder.name != "default_zen_store":
            for child in sorted(folder.iterdir()):
                artifacts[child.name] = size(child)
    print(
        json.dumps(
            {
                "config": config,
                "inference_images": count,
                "growth_bytes": growth,
                "zenml_artifact_bytes_by_name": artifacts,
                "home": str(home),
            }
        )
    )


if __name__ == "__main__":
    main()
