"""Independent check of a registered model: reload it from the MLflow registry and re-measure the test split.

Nothing from the pipeline's artifacts is used: the model comes back through
``models:/<name>/<version>``, the test images are decoded straight from the
dataset archive, and the threshold is the one recorded on the version. Exits 1
when the re-measured test AUC differs from the logged one by more than
``--tolerance``. Writes the full report (both operating points, 95% CIs) as JSON.

    python3 scripts/verify_registered.py --summary outputs/summary_quality.json
    python3 scripts/verify_registered.py --version champion --archive ../shared/data/chest_xray_224.zip
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xray.environment import use_project_environment  # noqa: E402 - the standard library only

use_project_environment(__file__, ("click", "numpy", "mlflow", "tensorflow"))

import click  # noqa: E402
import numpy as np

from xray.config.registry import MODEL_NAME

TEST_ENTRY = re.compile(r"(?:^|/)test/(NORMAL|PNEUMONIA)/(?!\._)[^/]+\.(?:jpe?g|png)$", re.IGNORECASE)


def test_split(archive: Path, image_size: int, batch: int = 64):
    """(labels, float32 images) for every test image in the archive, in name order."""
    from xray.data.images import decode_and_resize

    with zipfile.ZipFile(archive) as handle:
        names = sorted(n for n in handle.namelist() if TEST_ENTRY.search(n) and "__MACOSX" not in n)
        labels = np.array([int(TEST_ENTRY.search(n).group(1).upper() == "PNEUMONIA") for n in names])
        images = np.stack([decode_and_resize(handle.read(n), image_size).numpy() for n in names]).astype("float32")
    return labels, images


@click.command()
@click.option(
    "--summary",
    "summary_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="run.py --summary output; gives the model version and the run to compare with.",
)
@click.option("--version", default=None, help="A version number or an alias (default: the summary's version).")
@click.option("--model-name", default=MODEL_NAME, show_default=True)
@click.option(
    "--archive",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Dataset zip (default: $CHEST_XRAY_ZIP, then ../shared/data/chest_xray_224.zip).",
)
@click.option("--tolerance", default=0.005, show_default=True)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Report JSON (default: outputs/verify_v<version>.json).",
)
def main(summary_path, version, model_name, archive, tolerance, output):
    import mlflow

    from xray.evaluation import metrics
    from xray.registry import tracking
    from xray.registry.store import load_predictor
    from xray.storage import sources
    from xray.storage.s3 import sha256_file

    summary = json.loads(summary_path.read_text()) if summary_path else {}
    version = version or summary.get("model_version")
    if not version:
        raise click.UsageError("give --version or a --summary that names a model_version")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    predictor, info = load_predictor(model_name, str(version))
    client = mlflow.tracking.MlflowClient()
    run_id = client.get_model_version(model_name, info.version).run_id
    logged = client.get_run(run_id).data
    archive = archive or Path(sources.resolve(None).uri)
    if logged.params.get("dataset.sha256") not in (None, sha256_file(archive)):
        raise click.ClickException(f"{archive} is not the archive this version was trained on")

    labels, images = test_split(archive, info.image_size)
    print(f"reloaded {info.uri} (version {info.version}, run {run_id}); {len(labels)} test images from {archive}")
    probabilities = predictor.model.predict(images, batch_size=64, verbose=0).reshape(-1)
    report = metrics.evaluate(labels, probabilities, info.threshold, bootstrap_samples=2000, seed=0)
    difference = abs(report["auc"] - logged.metrics["test_auc"])
    report.update(
        model_uri=info.uri,
        version=info.version,
        run_id=run_id,
        logged_test_auc=logged.metrics["test_auc"],
        auc_difference=difference,
        tolerance=tolerance,
    )
    output = output or Path("outputs") / f"verify_v{info.version}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=float) + "\n")
    for name, point, ci in (
        ("chosen threshold %.4f" % info.threshold, report["at_threshold"], report["ci95"]),
        ("threshold 0.5", report["at_0_5"], report["ci95_at_0_5"]),
    ):
        print(
            f"  at {name}: "
            + ", ".join(
                f"{k} {point[k]:.3f} ({ci[k][0]:.3f}-{ci[k][1]:.3f})"
                for k in ("accuracy", "sensitivity", "specificity")
            )
        )
    print(
        f"  test AUC {report['auc']:.4f} ({report['ci95']['auc'][0]:.3f}-{report['ci95']['auc'][1]:.3f}); "
        f"logged {logged.metrics['test_auc']:.4f}; difference {difference:.5f} (tolerance {tolerance}); report {output}"
    )
    if difference > tolerance:
        raise click.ClickException(f"reloaded test AUC differs from the logged one by {difference:.4f} > {tolerance}")


if __name__ == "__main__":
    main()
