"""The GPU recipe (configs/training_sagemaker.yaml) measured on a lent GPU machine.

The lent machine has no TensorFlow and no package registry, and TensorFlow's CUDA wheels are far over what can be
carried to it; it does have JAX with CUDA. So the recipe runs there as Keras 3 on the JAX backend: the same Keras
layers as ``xray.model.network.build_model`` (ResNet50V2, [-1, 1] scaling inside the model, pooled features, Dense,
Dropout, a float32 sigmoid), the same settings resolved from the recipe's YAML by the project's own config loader,
the same patient-grouped val carved from train by the project's own manifest code, the epoch with the best val AUC
kept, and the threshold chosen on val (min_sensitivity policy) before the test split is scored once. XLA is JAX's
own compilation; "the strategy on the one GPU" is the one device JAX places everything on.

Two phases, on two machines:

    # here, with the project's venv: the splits and the resolved recipe (nothing is chosen here)
    .venv/bin/python benchmarks/gpu_recipe.py prepare ../shared/data/chest_xray_224.zip .devdata
    # on the GPU machine (Keras carried as wheels, see docs/BENCHMARKS.md "The GPU recipe")
    KERAS_BACKEND=jax python3 benchmarks/gpu_recipe.py run .devdata --out "$OUT"

``run`` imports nothing of ``xray`` (whose config needs pydantic, absent there); ``--limit``, ``--image-size`` and
``--epochs`` exist only for a smoke run of this script on a CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger("gpu_recipe")
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "training_sagemaker.yaml"


def prepare(archive: Path, folder: Path) -> None:
    """The splits and the resolved recipe, written with the project's own code."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from xray.config_file import load_config
    from xray.data.manifest import build_manifest, carve_val, remove_cross_split_duplicates, split_counts

    config = load_config(RECIPE)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
        root = Path(tmp)
        files = [
            (p.parts[-3], p.parts[-2], p.relative_to(root).as_posix())
            for p in sorted(root.rglob("*.jpeg"))
            if p.parts[-3] in ("train", "val", "test")
        ]
        manifest, quarantined, _ = build_manifest(root, files)
    manifest, _, _, _ = remove_cross_split_duplicates(manifest)
    manifest = carve_val(manifest, config.data.val_fraction, config.seed)
    manifest[["path", "split", "label", "patient_id"]].to_csv(folder / "splits.csv", index=False)
    recipe = {
        "seed": config.seed,
        "model": config.model.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json"),
        "evaluate": config.evaluate.model_dump(mode="json"),
        "counts": split_counts(manifest),
        "quarantined": len(quarantined),
    }
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=2))
    log.info("wrote %s and recipe.json: %s", folder / "splits.csv", recipe["counts"])


def _decode(zf_bytes: bytes, names: list[str], size: int) -> np.ndarray:
    from PIL import Image

    archive = zipfile.ZipFile(io.BytesIO(zf_bytes))
    blobs = [archive.read(name) for name in names]

    def one(blob: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(blob)).convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    with ThreadPoolExecutor(os.cpu_count() or 4) as pool:
        return np.stack(list(pool.map(one, blobs)))


def build(keras, model_config: dict, size: int):
    """The layers of xray.model.network.build_model (weights none). No augmentation layer inside: Keras marks its
    random preprocessing layers as not XLA-compatible and then runs the whole model uncompiled (the first lent-GPU
    run, 22 img/s); the project augments in tf.data, outside the model, and so does this script (``Augmented``)."""
    inputs = keras.Input((size, size, 3), name="image")
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(inputs)
    backbone = keras.applications.ResNet50V2(include_top=False, weights=None, input_tensor=scaled)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone.output)
    x = keras.layers.Dense(model_config["dense_units"], activation="relu", name="dense")(x)
    x = keras.layers.Dropout(model_config["dropout"], name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name="xray_resnet50v2")


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, minimum: float) -> float:
    """The highest threshold whose val sensitivity is at least ``minimum`` (so the best specificity among them)."""
    positives = np.sort(p[y == 1])[::-1]
    needed = int(np.ceil(minimum * len(positives)))
    return float(positives[needed - 1])


def auc(y: np.ndarray, p: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks = rankdata(p)
    n1 = int(y.sum())
    n0 = len(y) - n1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def bootstrap_auc(y: np.ndarray, p: np.ndarray, samples: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        index = rng.integers(0, len(y), len(y))
        if 0 < y[index].sum() < len(index):
            values.append(auc(y[index], p[index]))
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def run(
    folder: Path, out: Path, limit: int | None, image_size: int | None, epochs: int | None, budget_s: float | None
) -> dict:
    import keras

    recipe = json.loads((folder / "recipe.json").read_text())
    model_config, train, evaluate = recipe["model"], recipe["train"], recipe["evaluate"]
    size = image_size or model_config["image_size"]
    epochs = epochs or train["epochs"]
    keras.utils.set_random_seed(recipe["seed"])
    gpus = [d for d in __import__("jax").devices() if d.platform == "gpu"] if keras.backend.backend() == "jax" else []
    # As xray.model.network: float16 on a GPU, bfloat16 on a CPU.
    policy = ("mixed_float16" if gpus else "mixed_bfloat16") if train["mixed_precision"] != "off" else "float32"
    keras.mixed_precision.set_global_policy(policy)

    import pandas as pd

    splits = pd.read_csv(folder / "splits.csv")
    if limit:
        splits = splits.groupby(["split", "label"]).head(limit)
    archive_bytes = (folder / "chest_xray_224.zip").read_bytes()
    started = time.perf_counter()
    data = {}
    for split in ("train", "val", "test"):
        rows = splits[splits["split"] == split]
        data[split] = (
            _decode(archive_bytes, rows["path"].tolist(), size).astype(np.float32),
            (rows["label"] == "PNEUMONIA").to_numpy(np.float32),
        )
    log.info("decoded %s images in %.1f s", {k: len(v[1]) for k, v in data.items()}, time.perf_counter() - started)

    model = build(keras, model_config, size)
    jit = train["jit_compile"] != "off"
    model.compile(
        optimizer=keras.optimizers.Adam(train["learning_rate"]),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=train["label_smoothing"]),
        jit_compile=jit,
    )
    if jit and keras.backend.backend() == "jax" and not model.jit_compile:
        raise SystemExit("the model would run uncompiled (Keras refused jit_compile): nothing measured")
    x_train, y_train = data["train"]
    n, positives = len(y_train), float(y_train.sum())
    class_weight = {0: n / (2 * (n - positives)), 1: n / (2 * positives)} if train["class_weighting"] else None

    batch = train["batch_size"]

    def predict(x: np.ndarray) -> np.ndarray:
        # Padded to whole batches: one compiled shape for every call.
        padded = np.concatenate([x, np.zeros((-len(x) % batch, *x.shape[1:]), x.dtype)])
        return model.predict(padded, batch_size=batch, verbose=0).ravel()[: len(x)]

    x_val, y_val = data["val"]
    epoch_seconds: list[float] = []
    val_auc: list[float] = []
    best: dict = {}
    budget_started = time.perf_counter()

    class Track(keras.callbacks.Callback):
        """Epoch time, val AUC from our own padded predict, the best epoch's weights, and the wall-clock budget."""

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.start)
            val_auc.append(auc(y_val, predict(x_val)))
            if val_auc[-1] >= max(val_auc):
                best.update(epoch=epoch + 1, weights=model.get_weights())
            log.info("epoch %d/%d: train %.1f s, val_auc %.4f", epoch + 1, epochs, epoch_seconds[-1], val_auc[-1])
            patience_spent = epoch + 1 - best["epoch"] >= train["early_stopping_patience"]
            if patience_spent or (budget_s and time.perf_counter() - budget_started > budget_s):
                self.model.stop_training = True
                best["stopped"] = "early stopping" if patience_spent else f"time budget {budget_s} s"

    # Whole batches only: one compiled train step (a last partial batch would compile a second one).
    order = np.random.default_rng(recipe["seed"]).permutation(n)[: n - n % batch]
    augmentation = train["augmentation"]
    layers = []
    if augmentation.get("horizontal_flip"):
        layers.append(keras.layers.RandomFlip("horizontal", seed=recipe["seed"]))
    if augmentation.get("zoom"):
        layers.append(keras.layers.RandomZoom(augmentation["zoom"], seed=recipe["seed"]))
    augment = keras.Sequential(layers) if layers else None

    class Augmented(keras.utils.PyDataset):
        """Shuffled whole batches, flipped and zoomed on the device eagerly (a few ops per batch), then fed to the
        compiled train step."""

        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(recipe["seed"])
            self.order = order

        def __len__(self):
            return len(order) // batch

        def on_epoch_end(self):
            self.order = self.rng.permutation(order)

        def __getitem__(self, index):
            rows = self.order[index * batch : (index + 1) * batch]
            x = x_train[rows]
            if augment is not None:
                x = keras.ops.convert_to_numpy(augment(x, training=True))
            weights = sample_weight_of[rows] if sample_weight_of is not None else np.ones(len(rows), np.float32)
            return x, y_train[rows], weights

    sample_weight_of = np.array([class_weight[int(v)] for v in y_train], np.float32) if class_weight else None
    model.fit(Augmented(), epochs=epochs, callbacks=[Track()], verbose=0)
    model.set_weights(best["weights"])
    best_epoch = best["epoch"]
    steady = epoch_seconds[1:] or epoch_seconds
    trained = len(order)

    p_val = predict(x_val)
    if not np.isfinite(p_val).all() or p_val.std() == 0:
        log.error("val probabilities are constant or not finite: the training diverged")
    threshold = threshold_for_sensitivity(y_val, p_val, evaluate["min_sensitivity"])
    x_test, y_test = data["test"]
    started = time.perf_counter()
    p_test = predict(x_test)
    predict_seconds = time.perf_counter() - started
    predicted = p_test >= threshold
    sensitivity = float(predicted[y_test == 1].mean())
    specificity = float((~predicted[y_test == 0]).mean())
    result = {
        "device": str(gpus[0].device_kind) if gpus else "cpu",
        "backend": f"keras {keras.__version__} on {keras.backend.backend()}",
        "policy": policy,
        "image_size": size,
        "batch_size": train["batch_size"],
        "weights": "none (the recipe's imagenet cannot be downloaded on the machine)",
        "train_images": n,
        "train_images_per_epoch": trained,
        "epochs_run": len(epoch_seconds),
        "best_epoch_by_val_auc": best_epoch,
        "best_val_auc": round(float(max(val_auc)), 4),
        "first_epoch_s": round(epoch_seconds[0], 1),
        "epoch_s_median": round(float(np.median(steady)), 2),
        "train_img_per_s": round(trained / float(np.median(steady)), 0),
        "stopped_by": best.get("stopped", "the recipe's epochs"),
        "predict_img_per_s": round(len(y_test) / predict_seconds, 0),
        "threshold_from_val": round(threshold, 4),
        "test_auc": round(auc(y_test, p_test), 4),
        "test_auc_ci95": [round(v, 4) for v in bootstrap_auc(y_test, p_test, 2000, recipe["seed"])],
        "test_sensitivity": round(sensitivity, 4),
        "test_specificity": round(specificity, 4),
        "val_auc_per_epoch": [round(float(v), 4) for v in val_auc],
        "epoch_s": [round(s, 2) for s in epoch_seconds],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_recipe.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare")
    prep.add_argument("archive", type=Path)
    prep.add_argument("folder", type=Path)
    go = commands.add_parser("run")
    go.add_argument("folder", type=Path)
    go.add_argument("--out", type=Path, default=Path("."))
    go.add_argument("--limit", type=int, help="images per split and class (a smoke run only)")
    go.add_argument("--image-size", type=int)
    go.add_argument("--epochs", type=int)
    go.add_argument("--budget-s", type=float, help="stop training after this many seconds (the best epoch is kept)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.archive, args.folder)
        import shutil

        shutil.copyfile(args.archive, args.folder / "chest_xray_224.zip")
    else:
        print(json.dumps(run(args.folder, args.out, args.limit, args.image_size, args.epochs, args.budget_s)))


if __name__ == "__main__":
    main()
