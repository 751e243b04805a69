"""int8 with accuracy control (issue #46): a version's OpenVINO model quantized by NNCF's
``quantize_with_accuracy_control``, calibrated on train images and controlled on val images (never the test split).

NNCF keeps in higher precision the layers whose quantization costs val AUC until the AUC lost is at most
``max_drop``; then :func:`quantize` checks what NNCF does not: at least ``min_labels_unchanged`` of the val labels at
the version's threshold stay those of the fp32 model. The answer is the int8 model with its val figures, or none with
the reason it failed the control. The recipe (preset, model type, ignored scope) is recorded with it; the ones tried
are in docs/BENCHMARKS.md ("int8").
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score

logger = logging.getLogger(__name__)

MAX_DROP = 0.005
"""The val AUC an int8 model may lose against fp32 (absolute)."""
MIN_LABELS_UNCHANGED = 0.995
"""The share of val labels at the version's threshold that must stay those of fp32."""
BATCH = 32


@dataclass(frozen=True)
class Recipe:
    """NNCF's choices, by their NNCF names: ``preset`` (performance: symmetric; mixed: asymmetric activations),
    ``model_type`` (None or transformer), an ignored scope by operation type and by name pattern (e.g. the calibration
    head), ``subset_size`` calibration images; ``preprocessing_fp32``: the in-model input preprocessing (every
    operation from the image input up to and including the first convolution: the per-image standardization, or the
    fixed rescaling) stays fp32. Quantizing the per-image standardization's mean, variance and scale is what cost
    the champion 0.03 val AUC (docs/BENCHMARKS.md "int8"): it is left out by default."""

    preset: str = "performance"
    preprocessing_fp32: bool = True
    model_type: str | None = None
    ignored_types: tuple[str, ...] = ()
    ignored_patterns: tuple[str, ...] = ()
    subset_size: int = 300
    max_drop: float = MAX_DROP
    min_labels_unchanged: float = MIN_LABELS_UNCHANGED


@dataclass
class Int8Outcome:
    """The int8 model (an ``openvino.Model``) and the val figures it passed, or ``model`` None and ``reason``."""

    model: object | None
    reason: str
    recipe: Recipe
    val_auc_fp32: float
    val_auc_int8: float | None = None
    val_labels_unchanged: float | None = None
    seconds: float = 0.0
    images: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.model is not None

    def figures(self) -> dict:
        """What is stored and logged with the version: the recipe, the val figures, the verdict."""
        figures = {k: v for k, v in asdict(self).items() if k not in ("model", "recipe")}
        return figures | {"passed": self.passed, "recipe": asdict(self.recipe)}


def probabilities(compiled, pixels: np.ndarray) -> np.ndarray:
    """P(PNEUMONIA) of a compiled OpenVINO model on float32 pixels, in batches."""
    request = compiled.create_infer_request()
    out = []
    for start in range(0, len(pixels), BATCH):
        request.infer([np.asarray(pixels[start : start + BATCH], dtype=np.float32)])
        out.append(request.get_output_tensor(0).data.reshape(-1).copy())
    return np.concatenate(out) if out else np.zeros(0)


def val_auc(compiled, items) -> tuple[float, None]:
    """NNCF's validation function: AUC of the compiled model on (pixels, label) items. AUC has no value per image:
    on items of one class (NNCF probes with one item) it raises, so NNCF ranks the layers by how much each changes
    the model's outputs (normalized MSE) and checks the AUC on the whole val set."""
    items = list(items)
    labels = np.array([label for _, label in items])
    if len(set(labels.tolist())) != 2:
        raise ValueError("val AUC needs images of both classes")
    pixels = np.stack([pixels for pixels, _ in items])
    return float(roc_auc_score(labels, probabilities(compiled, pixels))), None


def preprocessing_operations(model) -> list[str]:
    """The names of the operations of an ``openvino.Model`` from its input up to and including the first convolution
    (in topological order; parameters and constants left out): the in-model preprocessing."""
    names = []
    for operation in model.get_ordered_ops():
        kind = operation.get_type_name()
        if kind not in ("Parameter", "Constant"):
            names.append(operation.get_friendly_name())
        if kind == "Convolution":
            return names
    return []  # no convolution: nothing is preprocessing before one


def _ignored_scope(recipe: Recipe, model):
    import nncf  # lazy: NNCF's import takes seconds, and only quantization needs it

    names = preprocessing_operations(model) if recipe.preprocessing_fp32 else []
    if not (recipe.ignored_types or recipe.ignored_patterns or names):
        return None
    return nncf.IgnoredScope(
        names=names, types=list(recipe.ignored_types), patterns=list(recipe.ignored_patterns), validate=False
    )


@contextlib.contextmanager
def on_stderr():
    """NNCF's log and progress bars on stderr while it runs: stdout carries a command's one JSON line."""
    from nncf.common.logging.logger import stdout_handler  # lazy: NNCF's import takes seconds

    stream = stdout_handler.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        stdout_handler.setStream(stream)


def quantize(model, calibration: np.ndarray, val: tuple[np.ndarray, np.ndarray], threshold: float, recipe=Recipe()):
    """``model`` (an ``openvino.Model`` in fp32) to int8 under the accuracy control: ``calibration`` train pixels
    (N, size, size, 3), ``val`` (pixels, 0/1 labels), ``threshold`` the version's. An :class:`Int8Outcome`."""
    import nncf  # lazy: NNCF's import takes seconds, and only quantization needs it
    import openvino as ov  # lazy: OpenVINO's import takes a second, and only a non-Keras runtime needs it

    started = time.perf_counter()
    pixels, labels = val
    if len(set(np.asarray(labels).tolist())) != 2:
        raise ValueError("the val images for the int8 control must hold both classes (AUC needs them)")
    core = ov.Core()
    reference = probabilities(core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), pixels)
    fp32_auc = float(roc_auc_score(labels, reference))
    images = {"calibration": len(calibration), "val": len(pixels)}
    items = [(pixels[i], int(labels[i])) for i in range(len(pixels))]
    try:
        with on_stderr():
            int8 = nncf.quantize_with_accuracy_control(
                model,
                calibration_dataset=nncf.Dataset(list(calibration), lambda x: np.asarray(x, dtype=np.float32)[None]),
                validation_dataset=nncf.Dataset(items, lambda item: np.asarray(item[0], dtype=np.float32)[None]),
                validation_fn=val_auc,
                max_drop=recipe.max_drop,
                drop_type=nncf.DropType.ABSOLUTE,
                preset=getattr(nncf.QuantizationPreset, recipe.preset.upper()),
                model_type=getattr(nncf.ModelType, recipe.model_type.upper()) if recipe.model_type else None,
                ignored_scope=_ignored_scope(recipe, model),
                subset_size=recipe.subset_size,
            )
    except nncf.ValidationError as error:  # the recipe names nothing in the model, or NNCF refuses its inputs
        return Int8Outcome(None, f"NNCF refused the recipe: {error}", recipe, fp32_auc, images=images)
    compiled = core.compile_model(int8, "CPU")
    quantized = probabilities(compiled, pixels)
    outcome = Int8Outcome(
        int8,
        "",
        recipe,
        fp32_auc,
        float(roc_auc_score(labels, quantized)),
        float(((quantized >= threshold) == (reference >= threshold)).mean()),
        images=images,
    )
    if fp32_auc - outcome.val_auc_int8 > recipe.max_drop:
        outcome.reason = (
            f"val AUC {outcome.val_auc_int8:.4f} lost more than {recipe.max_drop} against fp32 {fp32_auc:.4f}"
        )
    elif outcome.val_labels_unchanged < recipe.min_labels_unchanged:
        outcome.reason = (
            f"{outcome.val_labels_unchanged:.2%} of val labels unchanged at threshold {threshold:.3f} "
            f"(at least {recipe.min_labels_unchanged:.1%} needed)"
        )
    if outcome.reason:
        outcome.model = None
    outcome.seconds = round(time.perf_counter() - started, 1)
    logger.info("int8 with accuracy control: %s", outcome.reason or "passed")
    return outcome
