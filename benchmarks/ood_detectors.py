"""Out-of-distribution detectors side by side, and the batch-level drift test, on real images (issue #14).

    .venv/bin/python benchmarks/ood_detectors.py [--model-version champion] [--output benchmarks/ood/results.json]

Everything is measured against one registered model version (default: the champion of the MLflow store that
`make train` writes to):

1. **Per image, per detector**: each detector is fitted on the train split of the full archive (validated as the
   training pipeline does, seed 42), its decision threshold is the parametric 99th percentile of its log score on
   val, and the table gives the share flagged on val, the internal test split, the 55 adult X-rays of
   near_ood_adult_cxr_224.zip (as shipped, and re-encoded at JPEG quality 75 like the training archive), each
   synthetic shift of the test images, and the photographs and other non-radiographs that scikit-image ships;
   plus the AUROC of val against the adult X-rays. Detectors: the two the profile combines (content, acquisition),
   the classifier's own features (pooled embedding, dense layer, early-layer statistics) and a radial power
   spectrum. The row ``profile (registered)`` is the version's own reference profile, unchanged.
2. **Threshold stability**: the combined detector refitted on five val carves (seeds 42, 7, 1, 2, 3), with the
   parametric threshold and with the empirical 99th percentile of val.
3. **Export format**, with the registered profile: the test images as a site might send them (enlarged 2x or 4x,
   re-encoded as JPEG at quality 95, 50 or 30, or as PNG): in-distribution content should stay in distribution.
4. **Per batch**, with the registered profile: the drift test on the whole test split and on the adult X-rays; 20
   random batches of 100 test images, clean and with 10% of one shift mixed in (each shift in turn); and a batch of
   100 images of each shift.

Writes the JSON and prints Markdown tables for docs/MONITORING.md. Needs no network; about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from xray.config.registry import MODEL_NAME  # noqa: E402
from xray.environment import apply_defaults  # noqa: E402

apply_defaults()
SHARED = ROOT.parent / "shared" / "data"
SEEDS = (42, 7, 1, 2, 3)


def reencode(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def natural_images() -> list[np.ndarray]:
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    images = []
    for path in sorted(folder.iterdir()):
        if path.suffix in (".png", ".jpg"):
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
    faces = np.load(folder / "lfw_subset.npy")
    images += [np.repeat((face[..., None] * 255).astype(np.uint8), 3, axis=2) for face in faces]
    return images


class Sets:
    """The image sets every detector is measured on, as uint8 RGB arrays, grouped by name."""

    def __init__(self, dataset, near: list[np.ndarray]):
        from PIL import Image

        from xray.monitoring import drift

        manifest = dataset.manifest
        self.split_paths = {s: dataset.paths(manifest[manifest["split"] == s]) for s in ("train", "val", "test")}
        self.manifest = manifest
        load = lambda paths: [np.asarray(Image.open(p).convert("RGB")) for p in paths]  # noqa: E731
        self.images = {s: load(p) for s, p in self.split_paths.items()}
        self.images["adult (as shipped)"] = near
        self.images["adult (JPEG q75)"] = [reencode(image, 75) for image in near]
        for name in sorted(drift.SHIFTS):
            self.images[f"shift: {name}"] = [
                drift.apply_shift(name, image, i) for i, image in enumerate(self.images["test"])
            ]
        self.images["photographs (scikit-image)"] = natural_images()

    def evaluated(self) -> list[str]:
        return [name for name in self.images if name != "train"]


def carve(dataset, seed: int):
    """The manifest with val carved by another seed, exactly as the pipeline would."""
    from xray.data import manifest

    return manifest.carve_val(dataset.manifest, 0.1, seed)


def gaussian_threshold(val_scores: np.ndarray, alpha: float = 0.01) -> float:
    from scipy.stats import norm

    return float(val_scores.mean() + norm.ppf(1 - alpha) * val_scores.std())


def rates(scores: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    return {name: float((values > threshold).mean()) for name, values in scores.items()}


def auroc(val: np.ndarray, ood: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(val)), np.ones(len(ood))], np.r_[val, ood]))


def knn_detector(train: np.ndarray, components: int, neighbours: int = 20):
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    pca = PCA(min(components, train.shape[1]), whiten=True, random_state=0).fit(train)
    index = NearestNeighbors(n_neighbors=neighbours).fit(pca.transform(train))
    return lambda x: np.log(index.kneighbors(pca.transform(x))[0].mean(axis=1))


def mahalanobis_detector(train: np.ndarray, components: int | None = None):
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    if components:
        pca = PCA(min(components, train.shape[1]), whiten=True, random_state=0).fit(train)
        return lambda x: np.log(np.maximum((pca.transform(x) ** 2).sum(axis=1), 1e-12))
    mean, scale = train.mean(axis=0), np.maximum(train.std(axis=0), 1e-6)
    covariance = LedoitWolf().fit((train - mean) / scale)
    return lambda x: np.log(np.maximum(covariance.mahalanobis((x - mean) / scale), 1e-12))


def spectrum(image: np.ndarray) -> np.ndarray:
    """Radial log power spectrum of the grey image at 224 px, 12 bands, relative to the lowest."""
    from PIL import Image

    grey = np.asarray(Image.fromarray(image).convert("L").resize((224, 224), Image.Resampling.BOX), dtype=np.float64)
    window = np.hanning(224)[:, None] * np.hanning(224)[None, :]
    power = np.abs(np.fft.fftshift(np.fft.fft2((grey - grey.mean()) * window))) ** 2
    y, x = np.indices(power.shape) - 112
    radius = np.hypot(x, y)
    edges = np.geomspace(2, 112, 13)
    bands = np.array([np.log(power[(radius >= a) & (radius < b)].mean() + 1e-6) for a, b in zip(edges[:-1], edges[1:])])
    return bands - bands[0]


def classifier_features(model, images: list[np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """The classifier's pooled embedding, its dense layer, and the per-channel mean and std of an early block."""
    import keras
    import tensorflow as tf

    from xray.data.images import decode_and_resize

    outputs = {"pooled embedding": model.get_layer("pool").output, "dense layer": model.get_layer("dense").output}
    names = [layer.name for layer in model.layers]
    if "conv2_block3_out" in names:
        outputs["early-block statistics"] = model.get_layer("conv2_block3_out").output
    probe = keras.Model(model.inputs, list(outputs.values()))
    collected = {name: [] for name in outputs}
    for start in range(0, len(images), 64):
        batch = np.stack(
            [decode_and_resize(tf.constant(_png(image)), image_size).numpy() for image in images[start : start + 64]]
        ).astype(np.float32)
        for name, values in zip(outputs, probe.predict(batch, verbose=0)):
            if values.ndim == 4:
                values = np.concatenate([values.mean(axis=(1, 2)), values.std(axis=(1, 2))], axis=1)
            collected[name].append(values)
    return {name: np.concatenate(parts).astype(np.float64) for name, parts in collected.items()}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def detector_table(sets: Sets, features: dict, profile, predictor) -> list[dict]:
    from xray.monitoring import ood

    representations = {
        "content (profile)": lambda name: ood.stack(features[name])[0],
        "acquisition (profile)": lambda name: ood.stack(features[name])[1],
        "radial power spectrum": lambda name: np.stack([spectrum(i) for i in sets.images[name]]),
    }
    fitters = {
        "content (profile)": lambda x: knn_detector(x, 16),
        "acquisition (profile)": mahalanobis_detector,
        "radial power spectrum": mahalanobis_detector,
    }
    print("classifier features of every set ...", file=sys.stderr, flush=True)
    started = time.time()
    embedded = {
        name: classifier_features(predictor.model, sets.images[name], predictor.image_size)
        for name in ["train"] + sets.evaluated()
    }
    print(f"  {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    for layer in embedded["train"]:
        representations[f"classifier: {layer}"] = lambda name, layer=layer: embedded[name][layer]
        fitters[f"classifier: {layer}"] = (
            (lambda x: knn_detector(x, 16))
            if layer == "early-block statistics"
            else (lambda x: mahalanobis_detector(x, 64))
        )
    rows = []
    for detector, represent in representations.items():
        score = fitters[detector](represent("train"))
        scores = {name: score(represent(name)) for name in sets.evaluated()}
        threshold = gaussian_threshold(scores["val"])
        rows.append(
            {
                "detector": detector,
                "auroc_val_vs_adult": auroc(scores["val"], scores["adult (as shipped)"]),
                "flagged": rates(scores, threshold),
            }
        )
    assessed = {name: profile.assess(features[name]) for name in sets.evaluated()}
    statistic = {name: table["ood_score"].to_numpy() for name, table in assessed.items()}
    rows.append(
        {
            "detector": "profile (registered): combined + rules",
            "auroc_val_vs_adult": auroc(statistic["val"], statistic["adult (as shipped)"]),
            "flagged": {
                name: float((table["status"] == ood.OUT_OF_DISTRIBUTION).mean()) for name, table in assessed.items()
            },
        }
    )
    return rows


def stability_table(dataset, features_by_path: dict) -> list[dict]:
    """The combined detector refitted per val carve: parametric against empirical thresholds."""
    from xray.monitoring import ood

    rows = []
    for seed in SEEDS:
        manifest = carve(dataset, seed)
        pick = lambda split: [
            features_by_path[str(dataset.root / p)] for p in manifest.loc[manifest["split"] == split, "path"]
        ]  # noqa: E731,E501
        train, val, test = pick("train"), pick("val"), pick("test")
        profile = ood.fit_profile(train, val, np.full(len(val), 0.5), 0.5)
        row = {"seed": seed, "val_images": len(val), "parametric_threshold": profile.threshold}
        val_statistic = profile.val_scores * profile.threshold
        empirical = float(np.quantile(val_statistic, 0.99))
        for label, threshold in (("parametric", profile.threshold), ("empirical", empirical)):
            for name, group in (
                ("val", val),
                ("test", test),
                ("adult (as shipped)", features_by_path["adult"]),
                ("adult (JPEG q75)", features_by_path["adult_q75"]),
            ):
                pixels, stats = ood.stack(group)
                statistic = profile.statistic(*profile.z_scores(pixels, stats))
                row[f"{label}: {name}"] = float((statistic > threshold).mean())
        row["empirical_threshold"] = empirical
        rows.append(row)
    return rows


def export_table(profile, test_images: list[np.ndarray]) -> dict[str, float]:
    """Share of test images flagged when the same pictures arrive in another size or encoding."""
    from PIL import Image

    from xray.monitoring import ood

    def enlarged(image: np.ndarray, factor: int, method) -> np.ndarray:
        height, width = image.shape[:2]
        return np.asarray(Image.fromarray(image).resize((width * factor, height * factor), method))

    variants = {
        "as in the archive": lambda image: image,
        "enlarged 2x (bilinear)": lambda image: enlarged(image, 2, Image.Resampling.BILINEAR),
        "enlarged 4x (Lanczos)": lambda image: enlarged(image, 4, Image.Resampling.LANCZOS),
        "JPEG quality 95": lambda image: reencode(image, 95),
        "JPEG quality 50": lambda image: reencode(image, 50),
        "JPEG quality 30": lambda image: reencode(image, 30),
    }
    result = {}
    for name, change in variants.items():
        assessed = profile.assess([ood.features_of_array(change(image)) for image in test_images])
        result[name] = float((assessed["status"] == ood.OUT_OF_DISTRIBUTION).mean())
    return result


def batch_table(profile, features: dict, sets: Sets, permutations: int) -> dict:
    from xray.monitoring import drift, ood

    def run(group: list) -> dict:
        predictions = profile.assess(group)
        predictions["probability"] = 0.5
        report = drift.compare(profile, predictions, ood.feature_table(group, profile), permutations=permutations)
        return {
            "p_value": report["p_value"],
            "drift_detected": report["drift_detected"],
            "ood_fraction": report["ood_fraction"],
            "embedding_p_value": report["embedding"]["p_value"],
        }

    result = {"test split": run(features["test"]), "adult X-rays": run(features["adult (as shipped)"])}
    rng = np.random.default_rng(0)
    names = sorted(drift.SHIFTS)
    clean, mixed = [], {name: [] for name in names}
    for draw in range(20):
        picks = rng.choice(len(features["test"]), 100, replace=False)
        batch = [features["test"][i] for i in picks]
        clean.append(run(batch))
        for name in names:
            shifted = [
                ood.features_of_array(drift.apply_shift(name, sets.images["test"][i], 1000 * draw + i))
                for i in picks[:10]
            ]
            mixed[name].append(run(shifted + batch[10:]))
    result["20 clean batches of 100"] = {
        "detected": sum(r["drift_detected"] for r in clean),
        "p_values": [r["p_value"] for r in clean],
        "embedding_detected": sum(r["embedding_p_value"] < 0.01 for r in clean),
    }
    for name in names:
        result[f"20 batches of 100, 10% {name}"] = {
            "detected": sum(r["drift_detected"] for r in mixed[name]),
            "max_p_value": max(r["p_value"] for r in mixed[name]),
        }
        shifted = features[f"shift: {name}"]
        result[f"100 images, all {name}"] = run([shifted[i] for i in rng.choice(len(shifted), 100, replace=False)])
    return result


def markdown(results: dict) -> str:
    sets = list(results["detectors"][0]["flagged"])
    lines = [
        "| detector | AUROC val vs adult | " + " | ".join(sets) + " |",
        "| --- | --- | " + " | ".join("---" for _ in sets) + " |",
    ]
    for row in results["detectors"]:
        lines.append(
            f"| {row['detector']} | {row['auroc_val_vs_adult']:.3f} | "
            + " | ".join(f"{100 * row['flagged'][s]:.1f}%" for s in sets)
            + " |"
        )
    lines += [
        "",
        "| val carve seed | threshold | val | test | adult | adult q75 | empirical thr. | val | test | adult | adult q75 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["stability"]:
        cells = [f"{row['parametric_threshold']:.2f}"] + [
            f"{100 * row[f'parametric: {s}']:.1f}%" for s in ("val", "test", "adult (as shipped)", "adult (JPEG q75)")
        ]
        cells += [f"{row['empirical_threshold']:.2f}"] + [
            f"{100 * row[f'empirical: {s}']:.1f}%" for s in ("val", "test", "adult (as shipped)", "adult (JPEG q75)")
        ]
        lines.append(f"| {row['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "| test images sent as | flagged |", "| --- | --- |"]
    lines += [f"| {name} | {100 * share:.1f}% |" for name, share in results["export_format"].items()]
    lines += ["", "| batch | result |", "| --- | --- |"]
    for name, value in results["batches"].items():
        if "p_values" in value:
            text = (
                f"drift in {value['detected']} of 20 (p from {min(value['p_values']):.3g}); "
                f"embedding MMD p < 0.01 in {value['embedding_detected']} of 20"
            )
        elif "max_p_value" in value:
            text = f"drift in {value['detected']} of 20 (largest p {value['max_p_value']:.2g})"
        else:
            text = (
                f"drift {value['drift_detected']}, p = {value['p_value']:.3g}, {100 * value['ood_fraction']:.1f}% "
                f"out of distribution, embedding MMD p = {value['embedding_p_value']:.3g}"
            )
        lines.append(f"| {name} | {text} |")
    return "\n".join(lines)


@click.command()
@click.option("--model-version", default="champion", show_default=True)
@click.option("--model-name", default=MODEL_NAME, show_default=True)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=ROOT / "benchmarks" / "ood" / "results.json",
    show_default=True,
)
@click.option("--permutations", default=200, show_default=True, help="MMD permutations per batch (reported only).")
def main(model_version: str, model_name: str, output: Path, permutations: int) -> None:
    import mlflow

    from xray.config.data import DataConfig
    from xray.data.dataset import prepare_dataset
    from xray.monitoring import ood
    from xray.registry import store, tracking

    started = time.time()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    predictor, info = store.load_predictor(model_name, model_version)
    if predictor.profile is None:
        raise click.ClickException(f"{info.uri} has no reference profile")
    print(f"{info.uri}: profile threshold {predictor.profile.threshold:.3f}", file=sys.stderr, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="xray-ood-bench-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    dataset, _ = prepare_dataset(SHARED / "chest_xray_224.zip", workdir, DataConfig(), seed=42)
    with zipfile.ZipFile(SHARED / "near_ood_adult_cxr_224.zip") as archive:
        from PIL import Image

        near = [
            np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB"))
            for n in sorted(archive.namelist())
            if n.lower().endswith(".jpeg")
        ]
    sets = Sets(dataset, near)
    features = {name: [ood.features_of_array(i) for i in images] for name, images in sets.images.items()}
    by_path = {p: f for s in ("train", "val", "test") for p, f in zip(sets.split_paths[s], features[s])}
    by_path |= {"adult": features["adult (as shipped)"], "adult_q75": features["adult (JPEG q75)"]}
    results = {
        "model_uri": info.uri,
        "command": ".venv/bin/python benchmarks/ood_detectors.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "sets": {name: len(images) for name, images in sets.images.items()},
        "detectors": detector_table(sets, features, predictor.profile, predictor),
        "stability": stability_table(dataset, by_path),
        "export_format": export_table(predictor.profile, sets.images["test"]),
        "batches": batch_table(predictor.profile, features, sets, permutations),
    }
    results["seconds"] = round(time.time() - started, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    print(f"\nwritten {output} in {results['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
