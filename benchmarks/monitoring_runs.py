"""Issue #14's acceptance through the real command: `python3 run.py --pipeline monitoring` on each batch.

    .venv/bin/python benchmarks/monitoring_runs.py [--model-version champion] [--output benchmarks/ood/monitoring_runs.json]

Builds the batches from ../shared and scikit-image, runs the monitoring pipeline once per batch against the
registered version (the champion of the store `make train` writes to, by default), and records each run's JSON
summary and its per-image flag rate from the predictions CSV:

- the internal test split (624 images) and the 55 adult X-rays (the zip as it is);
- the photographs and other non-radiographs scikit-image ships (26 pictures and 200 small faces);
- 100 test images under each synthetic shift, and one batch of 100 test images with 10 of them inverted, beside the
  same 100 clean.
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import click
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def test_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    with zipfile.ZipFile(SHARED / "chest_xray_224.zip") as archive:
        names = sorted(
            n for n in archive.namelist() if "/test/" in n and n.lower().endswith(".jpeg") and "__MACOSX" not in n
        )
        for name in names:
            (folder / name.rsplit("/", 1)[1]).write_bytes(archive.read(name))
    return sorted(folder.iterdir())


def photographs(folder: Path) -> None:
    import skimage
    from PIL import Image

    folder.mkdir(parents=True)
    data = Path(skimage.__file__).parent / "data"
    for path in sorted(data.iterdir()):
        if path.suffix in (".png", ".jpg"):
            (folder / path.name).write_bytes(path.read_bytes())
    for i, face in enumerate(np.load(data / "lfw_subset.npy")):
        Image.fromarray((face * 255).astype(np.uint8)).save(folder / f"lfw_face_{i:03d}.png")


def write_shifted(sources: list[Path], folder: Path, name: str, seed: int) -> None:
    from PIL import Image

    from xray.monitoring import drift

    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sources):
        image = np.asarray(Image.open(path).convert("RGB"))
        Image.fromarray(drift.apply_shift(name, image, seed + i)).save(folder / f"{name}_{path.stem}.png")


def monitor(images: Path, model_version: str, output: Path) -> dict:
    from xray.monitoring import drift

    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "--pipeline",
        "monitoring",
        "--images",
        str(images),
        "--model-version",
        model_version,
        "--output",
        str(output),
    ]
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise click.ClickException(f"{' '.join(command)} failed: {result.stderr.strip().splitlines()[-1]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    table = pd.read_csv(output / "predictions.csv")
    readable = table[table["status"] != "unreadable"]
    reasons = readable.loc[readable["status"] == "out_of_distribution", "reason"].map(drift.reason_kind).value_counts()
    return summary | {
        "seconds": round(time.time() - started, 1),
        "flagged_per_image": float((readable["status"] == "out_of_distribution").mean()),
        "reasons": reasons.to_dict(),
    }


@click.command()
@click.option("--model-version", default="champion", show_default=True)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=ROOT / "benchmarks" / "ood" / "monitoring_runs.json",
    show_default=True,
)
def main(model_version: str, output: Path) -> None:
    from xray.monitoring import drift

    work = Path(tempfile.mkdtemp(prefix="xray-monitoring-runs-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    test = test_images(work / "test")
    photographs(work / "photographs")
    rng = np.random.default_rng(14)
    hundred = [test[i] for i in rng.choice(len(test), 100, replace=False)]
    batches = {
        "internal test split (624)": work / "test",
        "adult X-rays, near_ood_adult_cxr_224.zip (55)": SHARED / "near_ood_adult_cxr_224.zip",
        "photographs and non-radiographs, scikit-image (226)": work / "photographs",
    }
    for name in sorted(drift.SHIFTS):
        write_shifted(hundred, work / f"shift_{name}", name, 0)
        batches[f"100 test images, all {name}"] = work / f"shift_{name}"
    clean = work / "clean_100"
    clean.mkdir()
    for path in hundred:
        (clean / path.name).write_bytes(path.read_bytes())
    mixed = work / "mixed_100"
    mixed.mkdir()
    for path in hundred[10:]:
        (mixed / path.name).write_bytes(path.read_bytes())
    write_shifted(hundred[:10], mixed, "invert", 0)
    batches["100 test images"] = clean
    batches["the same 100, 10 of them inverted"] = mixed
    runs = {}
    for name, folder in batches.items():
        print(f"== {name}", file=sys.stderr, flush=True)
        runs[name] = monitor(
            folder, model_version, work / "out" / name.split(" (")[0].replace(" ", "_").replace(",", "")
        )
        print(
            json.dumps(
                {
                    k: runs[name][k]
                    for k in (
                        "drift_detected",
                        "p_value",
                        "ood_fraction",
                        "images",
                        "flagged_per_image",
                        "reasons",
                        "seconds",
                    )
                }
            ),
            flush=True,
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {"command": ".venv/bin/python benchmarks/monitoring_runs.py " + " ".join(sys.argv[1:]), "runs": runs},
            indent=1,
        )
        + "\n"
    )
    print(f"written {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
