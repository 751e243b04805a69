"""Per-image out-of-distribution rates of a registered version's reference profile: the internal test split and the
adult X-rays, scored the way batch inference and serving score them (ReferenceProfile.assess).

    .venv/bin/python benchmarks/ood_rates.py [--model-version champion] [--output benchmarks/ood/ood_rates.json]

A quick re-check of issue #14's first two acceptance numbers after the default recipe changes (test <= 3%,
adults >= 80%); `make bench-ood` measures everything.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
from xray.config.registry import MODEL_NAME  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SETS = {
    "internal_test": (SHARED / "chest_xray_224.zip", "/test/"),
    "adult": (SHARED / "near_ood_adult_cxr_224.zip", ""),
}


def extract(archive: Path, part: str, folder: Path) -> list[str]:
    paths = []
    with zipfile.ZipFile(archive) as source:
        for index, name in enumerate(sorted(source.namelist())):
            if name.lower().endswith((".jpeg", ".jpg", ".png")) and "__MACOSX" not in name and part in name:
                path = folder / f"{index:05d}_{Path(name).name}"
                path.write_bytes(source.read(name))
                paths.append(str(path))
    return paths


@click.command()
@click.option("--model-version", default="champion", show_default=True)
@click.option("--model-name", default=MODEL_NAME, show_default=True)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=ROOT / "benchmarks/ood/ood_rates.json",
    show_default=True,
)
def main(model_version: str, model_name: str, output: Path) -> None:
    import mlflow

    from xray.monitoring import ood
    from xray.registry import store, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    profile, info = store.load_reference_profile(model_name, model_version)
    result = {"model_uri": info.uri, "tracking_uri": mlflow.get_tracking_uri()}
    for name, (archive, part) in SETS.items():
        folder = Path(tempfile.mkdtemp(prefix=f"xray-{name}-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        paths = extract(archive, part, folder)
        flagged = profile.assess(ood.features_of_files(paths))["status"] != ood.OK
        result[name] = {"images": len(paths), "flagged": int(flagged.sum()), "fraction": float(flagged.mean())}
        click.echo(f"{name}: {flagged.sum()} of {len(paths)} flagged ({flagged.mean():.1%})", err=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
