"""A simulated second site, with and without it in training (issue #31; docs/BENCHMARKS.md "Retraining with a site").

    .venv/bin/python benchmarks/site_retraining.py [--workdir DIR] [--config configs/training_local.yaml] [--share 0.25]

**Simulated, not a hospital.** A patient-disjoint share of the Kaggle *train* split (never test: patients by a keyed
hash of their file-name id) is held out of the base source and given another acquisition: 12-bit CR DICOMs with a
different exposure curve (gamma 0.6 on the grey levels), Gaussian noise (sigma 4 grey levels) and a lower contrast
(levels mapped to 20-235), ViewPosition AP, its own manufacturer. Then, in one isolated MLflow/ZenML store:

A. the default recipe on the base source alone (the Kaggle archive minus the held-out patients), then
   ``--pipeline evaluation`` of that version on the simulated site's test patients;
B. the same recipe with the simulated site as a second source (``data.sources``; the site's patients split by the
   pipeline's keyed hash, 70/15/15), gated against A; then the same evaluation of B on the same test patients.

Printed and recorded in benchmarks/results.json (key ``site_retraining``): the site's test AUC, specificity at the
threshold and ECE with 95% CIs for A and B (B also at the site's own operating point), the base test metrics of both
and the gate's paired AUC difference on the base test.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from PIL import Image  # noqa: E402

from fixtures.dicom_factory import radiograph  # noqa: E402
from xray.config.data import DataConfig  # noqa: E402
from xray.config_file import load_config  # noqa: E402
from xray.data.manifest import patient_id  # noqa: E402
from xray.data.sites import identify_source, load_source  # noqa: E402
from xray.storage import sources  # noqa: E402

SITE = "simulated-b"
SELECTION_KEY = b"simulated-site-v1"  # which train patients become the simulated site
PATIENT_KEY = "simulated-site-benchmark"  # XRAY_PATIENT_KEY of the runs: the site's DICOM patients keep their hashes


def held_out(patient: str, share: float) -> bool:
    digest = hmac.new(SELECTION_KEY, patient.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def acquisition(data: bytes, rng: np.random.Generator) -> np.ndarray:
    """The simulated site's look: another exposure curve, lower contrast, noise (8-bit grey levels)."""
    with Image.open(io.BytesIO(data)) as picture:
        grey = np.asarray(picture.convert("RGB"), dtype=np.float64).mean(axis=2) / 255.0
    levels = 20 + 215 * grey**0.6 + rng.normal(0, 4, grey.shape)
    return np.clip(np.round(levels), 0, 255).astype(np.uint8)


def build(archive: Path, workdir: Path, share: float) -> dict:
    """The base archive without the held-out patients, and the simulated site's DICOM folder."""
    base, site = workdir / "base.zip", workdir / "site"
    rng = np.random.default_rng(0)
    counts = {"base_train": 0, "site_images": 0, "site_patients": set()}
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(base, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            name = info.filename
            parts = name.split("/")
            if info.is_dir() or "/__MACOSX" in name or parts[-1].startswith("."):
                continue
            if "/train/" in name and parts[-2] in ("NORMAL", "PNEUMONIA"):
                pid = patient_id(parts[-1])
                patient = f"{parts[-2].lower()}:{pid}" if pid else f"image:{parts[-1]}"
                if held_out(patient, share):
                    target = site / parts[-2] / (Path(parts[-1]).stem + ".dcm")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(
                        radiograph(
                            acquisition(source.read(name), rng),
                            bits=12,
                            modality="CR",
                            view="AP",
                            PatientID=patient,
                            Manufacturer="Simulated Vendor",
                        )
                    )
                    counts["site_images"] += 1
                    counts["site_patients"].add(patient)
                    continue
                counts["base_train"] += 1
            out.writestr(info, source.read(name))
    counts["site_patients"] = len(counts["site_patients"])
    return {"base": base, "site": site, **counts}


def site_test_folder(site: Path, workdir: Path, config) -> tuple[Path, dict]:
    """The simulated site's test patients (the pipeline's own split of it) as a labelled folder for evaluation."""
    raw = config.data.model_dump(mode="json")
    data = DataConfig.model_validate(raw | {"sources": [*raw["sources"], {"site": SITE, "uri": str(site)}]})
    (source,) = data.extra_sources
    manifest, report = load_source(
        source, identify_source(source, config.s3), workdir / "split", data, config.s3, workdir / "split-work"
    )
    folder = workdir / "site-test"
    for row in manifest[manifest["split"] == "test"].itertuples():
        # The manifest names the PNG of the display pixels that a DICOM becomes in a dataset: copy the DICOM itself.
        original = site / Path(row.path).relative_to(Path("sites", SITE)).with_suffix("")
        target = folder / row.label / original.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(original.read_bytes())
    return folder, report["counts"]


def run(args: list, env: dict, log: Path) -> dict:
    started = time.perf_counter()
    with open(log, "w") as stderr:
        result = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), *args], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    if result.returncode != 0:
        raise SystemExit(f"run.py {' '.join(map(str, args))} failed ({result.returncode}); see {log}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"run.py {' '.join(map(str, args[:2]))}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return summary | {"wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/xray-site-retraining"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "training_local.yaml")
    parser.add_argument("--share", type=float, default=0.25, help="share of train patients held out as the site")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config)
    built = build(Path(sources.resolve(None).uri), workdir, args.share)
    print(
        f"base train images {built['base_train']}; site {built['site_images']} images, {built['site_patients']} patients"
    )
    os.environ["XRAY_PATIENT_KEY"] = PATIENT_KEY
    test_folder, site_counts = site_test_folder(built["site"], workdir, config)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ZENML_"))} | {
        "ZENML_CONFIG_PATH": str(workdir / "zenml"),
        "ZENML_REPOSITORY_PATH": str(workdir),
        "ZENML_ANALYTICS_OPT_IN": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "XRAY_PATIENT_KEY": PATIENT_KEY,
    }
    raw = yaml.safe_load(args.config.read_text())
    raw["dataset_uri"] = str(built["base"])
    raw["train"]["backup_dir"] = str(workdir / "checkpoints")
    without = workdir / "without.yaml"
    without.write_text(yaml.safe_dump(raw))
    raw["data"]["sources"] = [{"site": "guangzhou"}, {"site": SITE, "uri": str(built["site"])}]
    with_site = workdir / "with.yaml"
    with_site.write_text(yaml.safe_dump(raw))

    def train_and_evaluate(config: Path, name: str) -> tuple[dict, dict]:
        """One training run, then its version on the simulated site's test patients."""
        trained = run(["--pipeline", "training", "--config", config], env, workdir / f"{name}.log")
        evaluation = ["--pipeline", "evaluation", "--config", config, "--dataset-uri", test_folder, "--site", SITE]
        site = run([*evaluation, "--model-version", trained["model_version"]], env, workdir / f"{name}-eval.log")
        return trained, site

    a, a_site = train_and_evaluate(without, "a")
    b, b_site = train_and_evaluate(with_site, "b")
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version(raw.get("registry", {}).get(
        "model_name", "chest-xray-classifier"), b["model_version"]).tags  # fmt: skip
    gate = {
        key.removeprefix("gate.test:guangzhou."): float(value)
        for key, value in tags.items()
        if key.startswith("gate.test:guangzhou.") and key.split(".")[-1] != "images"
    }
    keys = ("auc", "auc_ci_low", "auc_ci_high", "specificity", "specificity_ci_low", "specificity_ci_high", "ece",
            "ece_ci_low", "ece_ci_high", "sensitivity", "sensitivity_ci_low", "sensitivity_ci_high", "threshold")  # fmt: skip
    result = {
        "simulated": True,
        "share_of_train_patients": args.share,
        "site_images": built["site_images"],
        "site_patients": built["site_patients"],
        "site_split_counts": site_counts,
        "base_train_images": built["base_train"],
        "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
        "without_site": {
            "model_version": a["model_version"],
            "site_test": {k: a_site["metrics"].get(k, a_site.get(k)) for k in keys},
            "base_test": a["metrics"],
            "wall_s": a["wall_s"],
        },
        "with_site": {
            "model_version": b["model_version"],
            "promoted": b["promoted"],
            "promotion_reason": b["promotion_reason"],
            "site_test": {k: b_site["metrics"].get(k, b_site.get(k)) for k in keys},
            "site_test_at_own_operating_point": b["sites"].get(SITE, {}).get("own_operating_point"),
            "base_test": b["metrics"],
            "base_test_gate_vs_without": gate,
            "sites": b["sites"],
            "wall_s": b["wall_s"],
        },
    }
    print(json.dumps(result, indent=1))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import record

    record("site_retraining", result, ".venv/bin/python benchmarks/site_retraining.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
