"""Training images/s of the classifier by input size, on in-memory tensors: what a recipe's epochs cost here.

    .venv/bin/python benchmarks/fit_throughput.py [--backbones resnet50v2 ...] [--sizes 96 128 160 224] [--steps 12]

The quality budget (issue #5) is wall time on a 2-vCPU machine, and those VMs are not all alike: this prints the
measured rate per size and records it in benchmarks/results.json under ``fit_throughput_by_size``, with the CPU
model and flags, so a recipe's epoch count can be planned on the machine at hand. No target: nothing here passes or
fails.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import BATCH, _fit_throughput, record

from xray.config.model import ModelConfig
from xray.model.network import BACKBONES, build_model, compile_model

KEY = "fit_throughput_by_size"


def rate_at(backbone: str, size: int, steps: int) -> float:
    """Same model, optimizer and loss as the quality recipe (AdamW, label smoothing), fed by one cached batch."""
    import tensorflow as tf

    model, _ = build_model(ModelConfig(backbone=backbone, image_size=size, input_normalization="per_image"), None)
    compile_model(model, 1e-3, 0.05, False, weight_decay=0.02)
    x = tf.random.uniform((BATCH, size, size, 3), 0, 255, seed=0)
    y = tf.cast(tf.random.uniform((BATCH, 1), seed=1) > 0.5, tf.float32)
    return _fit_throughput(model, tf.data.Dataset.from_tensors((x, y)).repeat(), steps, epochs=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet50v2"], choices=sorted(BACKBONES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[96, 128, 160, 224])
    parser.add_argument("--steps", type=int, default=12, help="steps per timed epoch (one warm-up epoch before)")
    args = parser.parse_args()
    start = time.perf_counter()
    rates: dict[str, dict[str, float]] = {}
    for backbone in args.backbones:
        for size in args.sizes:
            rates.setdefault(backbone, {})[str(size)] = rate = rate_at(backbone, size, args.steps)
            print(f"{backbone} {size} px: {rate:.1f} img/s", flush=True)
    record(
        KEY,
        {
            "images_per_s": rates,
            "batch_size": BATCH,
            "steps_per_epoch": args.steps,
            "benchmark_seconds": time.perf_counter() - start,
        },
        ".venv/bin/python benchmarks/fit_throughput.py " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
