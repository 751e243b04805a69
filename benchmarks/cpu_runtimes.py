"""CPU inference runtimes, side by side on the champion (issue #33 item 3): compiled Keras (fp32) against OpenVINO
(fp32, and bf16 where the CPU has AMX/AVX-512 BF16), on the 624 test images.

    pip install --target /tmp/ovsite openvino openvino-telemetry    # not in the lock: a trial, not a dependency
    PYTHONPATH=/tmp/ovsite python benchmarks/cpu_runtimes.py [--model-version champion] [--rounds 3]

Every runtime scores the same decoded test images (the project's decode and resize) in batches of 32; the rates are
the median of ``--rounds`` alternating passes. A runtime would ship only at >= 1.3x the Keras rate with, on these
images, probabilities within 1e-4 of Keras (fp32) or, for bf16, AUC within 0.002 and >= 99.5% of labels unchanged
at the version's threshold. The verdict is printed and recorded; nothing here changes what inference runs.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xray.config import MODEL_NAME  # noqa: E402


def _test_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf

    from xray.data.images import decode_and_resize

    with zipfile.ZipFile(ROOT.parent / "shared" / "data" / "chest_xray_224.zip") as handle:
        names = sorted(n for n in handle.namelist() if "/test/" in n and n.endswith(".jpeg"))
        pixels = [decode_and_resize(tf.constant(handle.read(n)), size).numpy() for n in names]
    labels = np.array([1 if "/PNEUMONIA/" in n else 0 for n in names])
    return np.stack(pixels).astype(np.float32), labels


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def runtimes_for(model, core, precisions: list[str]) -> dict:
    """name -> a function from a batch of pixels to probabilities: compiled Keras, and OpenVINO at each precision
    (the model exported as a SavedModel and converted)."""
    import openvino as ov
    import tensorflow as tf

    keras_call = tf.function(lambda batch: model(batch, training=False), jit_compile=False)
    with tempfile.TemporaryDirectory() as folder:
        model.export(folder, format="tf_saved_model", verbose=False)
        converted = ov.convert_model(folder)
    runtimes = {"keras fp32": lambda b: keras_call(tf.constant(b)).numpy().ravel()}
    for precision in precisions:
        compiled = core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        runtimes[f"openvino {precision}"] = lambda b, c=compiled: np.asarray(c(b)[0]).ravel()
    return runtimes


def rates_of(runtimes: dict, batches: list[np.ndarray], rounds: int) -> dict[str, float]:
    """Median images/s of each runtime over ``rounds`` passes, the runtimes alternating within each round."""
    rates = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, run in runtimes.items():
            started = time.perf_counter()
            for b in batches:
                run(b)
            rates[name].append(sum(len(b) for b in batches) / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def speed_only(size: int, rounds: int, core, precisions: list[str]) -> dict:
    """The same rates for the production recipe's shape: ResNet50V2 at ``size`` px with random weights (speed does
    not depend on them; no probability is compared)."""

    from xray.config import ModelConfig
    from xray.model.network import build_model

    model, _ = build_model(ModelConfig(image_size=size), None)
    x = np.random.default_rng(0).uniform(0, 255, (256, size, size, 3)).astype(np.float32)
    batches = [x[i : i + 32] for i in range(0, len(x), 32)]
    runtimes = runtimes_for(model, core, precisions)
    for run in runtimes.values():
        run(batches[0])
    rates = rates_of(runtimes, batches, rounds)
    return {
        name: {"images_per_s": round(rate, 1), "speedup": round(rate / rates["keras fp32"], 3)}
        for name, rate in rates.items()
    } | {"image_size": size}


@click.command()
@click.option("--model-version", default="champion", show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option(
    "--speed-size", default=128, show_default=True, help="Also time a random ResNet50V2 at this size (0: no)."
)
def main(model_version: str, rounds: int, speed_size: int) -> None:
    import bench
    import mlflow
    import openvino as ov

    from xray.registry import store, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    predictor, info = store.load_predictor(MODEL_NAME, model_version)
    model, threshold = predictor.model, predictor.threshold
    x, y = _test_images(predictor.image_size)
    batches = [x[i : i + 32] for i in range(0, len(x), 32)]

    core = ov.Core()
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    precisions = ["f32"] + (["bf16"] if "BF16" in capabilities else [])
    runtimes = runtimes_for(model, core, precisions)
    # Warm-up, and each runtime's probabilities on the whole test split.
    probabilities = {name: np.concatenate([run(b) for b in batches]) for name, run in runtimes.items()}
    rates = rates_of(runtimes, batches, rounds)
    reference = probabilities["keras fp32"]
    rows = {}
    for name in runtimes:
        p = probabilities[name]
        rows[name] = {
            "images_per_s": round(rates[name], 1),
            "speedup": round(rates[name] / rates["keras fp32"], 3),
            "max_abs_probability_difference": float(np.abs(p - reference).max()),
            "auc": round(_auc(y, p), 5),
            "labels_unchanged": float(((p >= threshold) == (reference >= threshold)).mean()),
        }
        fp32 = "fp32" in name or "f32" in name
        close = (
            rows[name]["max_abs_probability_difference"] <= 1e-4
            if fp32
            else abs(rows[name]["auc"] - rows["keras fp32"]["auc"]) <= 0.002 and rows[name]["labels_unchanged"] >= 0.995
        )
        rows[name]["ships"] = bool(name != "keras fp32" and close and rows[name]["speedup"] >= 1.3)
    best = max((n for n in rows if n != "keras fp32"), key=lambda n: rows[n]["speedup"])
    summary = {"runtimes": rows, "best": best, "model": info["uri"], "image_size": predictor.image_size}
    if speed_size:
        summary["speed_only"] = speed_only(speed_size, rounds, core, precisions)
    summary |= {"threshold": threshold, "images": len(x), "cpu_capabilities": capabilities, "openvino": ov.__version__}
    print(json.dumps(summary, indent=1))
    bench.record(
        "cpu_runtime_speedup",
        {"value": rows[best]["speedup"], "unit": f"{best} images/s over compiled Keras fp32", **summary},
        "python benchmarks/cpu_runtimes.py " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
