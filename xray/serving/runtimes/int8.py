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
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from xray.config.registry import Int8Config
from xray.data.inputs import labels_of, make_dataset, make_spec_for_inference
from xray.serving.predictor import openvino_model

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

    @classmethod
    def of(cls, config: Int8Config) -> Recipe:
        """The recipe of ``registry.int8``: the defaults (docs/BENCHMARKS.md "int8") with its control's bounds."""
        return cls(
            subset_size=config.calibration_images,
            max_drop=config.max_drop,
            min_labels_unchanged=config.min_labels_unchanged,
        )


@dataclass
class Int8Outcome:
    """The int8 model (an ``openvino.Model``) and the val figures it passed, or ``model`` None and ``reason``."""

    model: object | None
    reason: str
    recipe: Recipe
    val_auc_fp32: float | None
    """None where no int8 was made (:meth:`not_made`)."""
    val_auc_int8: float | None = None
    val_labels_unchanged: float | None = None
    seconds: float = 0.0
    images: dict[str, int] = field(default_factory=dict)

    @classmethod
    def not_made(cls, recipe: Recipe | None = None) -> Int8Outcome:
        """The outcome where ``registry.int8.enabled`` is off: no int8, nothing measured."""
        return cls(None, NOT_MADE_REASON, recipe or Recipe(), None)

    @property
    def passed(self) -> bool:
        return self.model is not None

    @property
    def made(self) -> bool:
        """Whether quantization ran (passed or failed its control)."""
        return self.reason != NOT_MADE_REASON

    @property
    def state(self) -> str:
        """The version's ``int8`` tag: ``passed`` (it carries an int8 model), ``failed: <why>`` or ``not made``."""
        if not self.made:
            return "not made"
        return "passed" if self.passed else f"failed: {self.reason}"[:480]

    def figures(self) -> dict:
        """What is stored and logged with the version: the recipe, the val figures, the verdict."""
        figures = {k: v for k, v in asdict(self).items() if k not in ("model", "recipe")}
        return figures | {"passed": self.passed, "recipe": asdict(self.recipe)}

    def summary(self) -> dict:
        """The figures a run's summary line shows."""
        keys = ("passed", "reason", "val_auc_fp32", "val_auc_int8", "val_labels_unchanged", "seconds")
        return {key: self.figures()[key] for key in keys}

    def metrics(self) -> dict[str, float]:
        """The run's MLflow metrics: ``int8_<figure>`` of every figure measured."""
        return {f"int8_{key}": value for key, value in self.summary().items() if isinstance(value, float)}

    def card_line(self) -> str:
        """The model card's line (markdown)."""
        if not self.made:
            return NOT_MADE
        recipe = f"preset {self.recipe.preset}, {self.images.get('calibration', 0)} train images calibrating"
        if not self.passed:
            return f"- int8 (OpenVINO, NNCF accuracy control): **none**: it failed its val control ({self.reason})."
        return (
            f"- int8 (OpenVINO, NNCF accuracy control, {recipe}): passed its val control on "
            f"{self.images.get('val', 0)} val images: AUC {self.val_auc_int8:.4f} against fp32 {self.val_auc_fp32:.4f} "
            f"(at most {self.recipe.max_drop} lost), {self.val_labels_unchanged:.2%} of labels unchanged at the threshold "
            f"(at least {self.recipe.min_labels_unchanged:.1%}). `inference.runtime: auto` may run it."
        )


NOT_MADE_REASON = "not made: registry.int8.enabled is off"
NOT_MADE = "- int8: not made (`registry.int8.enabled` was off); the version runs on Keras or OpenVINO fp32/bf16."

FIGURES_FILE, MODEL_FILE = "int8.json", "model.xml"


def save(outcome: Int8Outcome, folder: str | Path) -> None:
    """``folder``: the int8 model (model.xml, model.bin) where it passed the control, its figures and recipe
    (int8.json) either way. A version's ``data/int8/`` (xray.serving.bundle) and the ZenML artifact hold the same."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if outcome.passed:
        import openvino as ov  # lazy: OpenVINO's import takes a second, and only an int8 model needs it

        ov.save_model(outcome.model, folder / MODEL_FILE, compress_to_fp16=False)
    (folder / FIGURES_FILE).write_text(json.dumps(outcome.figures(), indent=1, sort_keys=True))


def load(folder: str | Path) -> Int8Outcome:
    """What :func:`save` wrote, back as an :class:`Int8Outcome`."""
    figures = json.loads((Path(folder) / FIGURES_FILE).read_text())
    model = None
    if figures["passed"]:
        import openvino as ov  # lazy: as above

        model = ov.Core().read_model(Path(folder) / MODEL_FILE)
    kept = {k: figures[k] for k in ("reason", "val_auc_fp32", "val_auc_int8", "val_labels_unchanged", "seconds")}
    recipe = figures["recipe"]
    recipe = Recipe(**recipe | {k: tuple(recipe[k]) for k in ("ignored_types", "ignored_patterns")})
    return Int8Outcome(model, recipe=recipe, images=figures["images"], **kept)


def control_images(dataset, image_size: int, calibration_images: int, seed: int) -> tuple[np.ndarray, tuple]:
    """(calibration pixels: ``calibration_images`` of train drawn with ``seed``; (val pixels, val 0/1 labels): all of
    val) of a validated dataset (xray.data.dataset.ValidatedDataset), decoded and resized as the model sees them.
    Val is the patient-grouped split the version's threshold was chosen on; test is never read."""
    manifest = dataset.manifest
    train = manifest[manifest["split"] == "train"]
    train = train.sample(min(calibration_images, len(train)), random_state=seed)
    val = manifest[manifest["split"] == "val"]

    def pixels(rows) -> np.ndarray:  # the prediction input pipeline: parallel decoding, the training's resizing
        batches = make_dataset(dataset.paths(rows), None, make_spec_for_inference(image_size))
        return np.concatenate([images.numpy() for images, _ in batches])

    return pixels(train), (pixels(val), labels_of(val).astype(int))


def make(model, dataset, image_size: int, threshold: float, config: Int8Config, seed: int) -> Int8Outcome:
    """The int8 of a version at registration: its Keras ``model`` converted to OpenVINO and quantized under the val
    control of ``registry.int8`` (:func:`quantize`) on ``dataset``'s train and val (:func:`control_images`)."""
    started = time.perf_counter()
    calibration, val = control_images(dataset, image_size, config.calibration_images, seed)
    outcome = quantize(openvino_model(model), calibration, val, threshold, Recipe.of(config))
    outcome.seconds = round(time.perf_counter() - started, 1)
    logger.info(
        "int8: %s in %.0f s (val AUC %s against fp32 %.4f, labels unchanged %s)",
        "passed its val control" if outcome.passed else f"failed its val control: {outcome.reason}",
        outcome.seconds,
        "-" if outcome.val_auc_int8 is None else f"{outcome.val_auc_int8:.4f}",
        outcome.val_auc_fp32,
        "-" if outcome.val_labels_unchanged is None else f"{outcome.val_labels_unchanged:.2%}",
    )
    return outcome


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
