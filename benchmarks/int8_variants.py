"""Plain ``nncf.quantize`` variants on a version's model, without the accuracy control (issue #46): val AUC, val
labels unchanged at the threshold, and how the probabilities move; to find where int8 loses AUC before spending an
accuracy-control ranking on it (docs/BENCHMARKS.md, "int8 with accuracy control").

    .venv/bin/python benchmarks/int8_variants.py --keras data/model.keras --splits splits.npz --threshold 0.64 default

``--splits``: the .npz that ``benchmarks/cpu_runtimes.py --int8 --splits-cache`` writes (train calibration pixels,
val pixels and labels). One JSON line per variant on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = (
    "default",
    "ignore Add",
    "no bias correction",
    "first convolution fp32",
    "preprocessing fp32",
    "activations mean quantile",
    "overflow fix off",
)


def options(name: str, model) -> dict:
    import nncf

    if name == "ignore Add":
        return {"ignored_scope": nncf.IgnoredScope(types=["Add"], validate=False)}
    if name == "no bias correction":
        return {"advanced_parameters": nncf.AdvancedQuantizationParameters(disable_bias_correction=True)}
    if name == "preprocessing fp32":  # the recipe's default since 2026-12-06 (Recipe.preprocessing_fp32)
        from xray.serving.runtimes.int8 import preprocessing_operations

        return {"ignored_scope": nncf.IgnoredScope(names=preprocessing_operations(model), validate=False)}
    if name == "activations mean quantile":
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        parameters = nncf.AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MEAN_QUANTILE
        )
        return {"advanced_parameters": parameters}
    if name == "overflow fix off":
        from nncf.quantization.advanced_parameters import OverflowFix

        return {"advanced_parameters": nncf.AdvancedQuantizationParameters(overflow_fix=OverflowFix.DISABLE)}
    if name == "first convolution fp32":
        first = next(o.get_friendly_name() for o in model.get_ordered_ops() if o.get_type_name() == "Convolution")
        return {"ignored_scope": nncf.IgnoredScope(names=[first])}
    return {}


@click.command()
@click.option("--keras", "keras_path", required=True, type=click.Path(exists=True))
@click.option("--splits", required=True, type=click.Path(exists=True))
@click.option("--threshold", required=True, type=float)
@click.argument("variants", nargs=-1, type=click.Choice(VARIANTS))
def main(keras_path: str, splits: str, threshold: float, variants: tuple[str, ...]) -> None:
    import keras
    import nncf
    import openvino as ov
    from sklearn.metrics import roc_auc_score

    from xray.serving.predictor import openvino_model
    from xray.serving.runtimes.int8 import on_stderr, probabilities

    with np.load(splits) as saved:
        calibration, val, labels = saved["calibration"], saved["val"], saved["val_labels"]
    model = openvino_model(keras.models.load_model(keras_path))
    core = ov.Core()
    reference = probabilities(core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), val)
    for name in variants:
        started = time.perf_counter()
        with on_stderr():
            int8 = nncf.quantize(
                model, nncf.Dataset(list(calibration), lambda x: x[None]), subset_size=300, **options(name, model)
            )
        p = probabilities(core.compile_model(int8, "CPU"), val)
        row = {
            "variant": name,
            "val_auc_fp32": float(roc_auc_score(labels, reference)),
            "val_auc": float(roc_auc_score(labels, p)),
            "labels_unchanged": float(((p >= threshold) == (reference >= threshold)).mean()),
            "flipped_up": int(((p >= threshold) & (reference < threshold)).sum()),
            "flipped_down": int(((p < threshold) & (reference >= threshold)).sum()),
            "mean_shift": float((p - reference).mean()),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
