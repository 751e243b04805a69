"""The one prediction path: image bytes -> probability, label, and whether the image is like the training data.

Batch inference (:mod:`xray.serving.batch`), REST serving (:mod:`xray.serving.pyfunc`) and monitoring all predict
through :class:`ChestXrayPredictor`, built from a registered version's folder by :func:`xray.serving.bundle.read`.
The preprocessing is the same :func:`xray.data.images.decode_and_resize` used in training.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd

from xray import CLASS_NAMES
from xray.config.limits import DecodeLimits, OverLimit, PixelBudget
from xray.config.scope import ScopeConfig
from xray.data.dicom import DicomHeader
from xray.data.images import decode_and_resize, decode_image
from xray.errors import ConfigError
from xray.evaluation.calibration import Calibration, logit
from xray.monitoring import ood, scope
from xray.monitoring.scope import OUT_OF_SCOPE, ScopeResult

UID_COLUMNS = ["study_instance_uid", "series_instance_uid", "sop_instance_uid"]
OUTPUT_COLUMNS = [
    "probability",
    "label",
    "threshold",
    "ood_score",
    "content_z",
    "acquisition_z",
    "status",
    "reason",
    "scope_unchecked",
    *UID_COLUMNS,
    "site",
    "operating_point",
    "model_version",
    "runtime",
]
"""One row per image. ``status``: ok, out_of_scope (the DICOM header says the image is not of the validated kind),
out_of_distribution (the pixels are unlike the training images) or unreadable. ``label`` is empty unless ``status`` is
``ok``: an image out of scope or out of distribution keeps its probability and score, but no answer a client could
read as the model's verdict. ``content_z`` and ``acquisition_z``: the out-of-distribution detector's two
standardised scores, which ``ood_score`` combines (xray.monitoring.ood; empty where it is). ``scope_unchecked``: the
scope's tags a DICOM header lacks (comma-separated). The UIDs are a DICOM image's; all three are empty for JPEG and
PNG. ``site`` and ``operating_point``: the site asked for
(``--site``, serving's ``params.site``) and whose calibration and threshold the probability and label are at: ``version``
(the version's own, fitted on val of every training site) or ``site:<name>``. ``runtime``: what computed the
probability (:meth:`ChestXrayPredictor.use_runtime`: ``keras f32``, ``openvino int8``...)."""

NUMERIC_COLUMNS = ("probability", "threshold", *ood.SCORE_COLUMNS)
"""The output columns that are numbers (the rest are text)."""
VERSION_OPERATING_POINT = "version"
RUNTIMES = ("auto", "keras", "openvino")
logger = logging.getLogger(__name__)


def choose_runtime(setting: str, has_int8: bool = False) -> tuple[str, str]:
    """The first of :func:`runtime_candidates`: what ``setting`` runs where no measurement decides."""
    return runtime_candidates(setting, has_int8)[0]


def runtime_candidates(setting: str, has_int8: bool = False) -> list[tuple[str, str]]:
    """(runtime, precision) pairs the model may run on for ``setting`` (XRAY_INFERENCE_RUNTIME overrides it) on this
    machine; where there are two, :meth:`ChestXrayPredictor.use_runtime` runs the faster in a short warm-up.

    ``openvino``: bf16 where the CPU has BF16 (AMX, AVX-512 BF16), else f32. ``auto``, where no GPU is visible: the
    version's int8 (``has_int8``: made under the val accuracy control, xray.serving.runtimes.int8) and OpenVINO bf16
    where the CPU has both kinds of kernels: measured, since neither wins everywhere (bf16 6.07x the compiled Keras
    rate on AMX; on AVX-512 BF16 without AMX int8 3.95x and bf16 2.30x); else whichever of the two there is; else
    Keras. OpenVINO fp32 measured 1.13-1.3x, under the 1.3x bar (docs/BENCHMARKS.md, "CPU runtimes" and "int8")."""
    setting = os.environ.get("XRAY_INFERENCE_RUNTIME") or setting
    if setting not in RUNTIMES:
        raise ConfigError(f"inference runtime {setting!r} is not one of {', '.join(RUNTIMES)}")
    if setting == "keras":
        return [("keras", "f32")]
    import openvino as ov  # lazy: OpenVINO's import takes a second, and only a non-Keras runtime needs it

    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if setting == "openvino":
        return [("openvino", "bf16" if bf16 else "f32")]
    import tensorflow as tf  # lazy: TensorFlow's import takes seconds

    if tf.config.list_physical_devices("GPU"):
        return [("keras", "f32")]
    found = [("openvino", "int8")] * has_int8 + [("openvino", "bf16")] * bf16
    return found or [("keras", "f32")]


def warm_up_rates(forwards: dict, image_size: int, rounds: int = 3, batch: int = 8, clock=time.perf_counter) -> dict:
    """Images per second of each ``forwards`` (name -> pixels -> probabilities) on this machine: one call to warm it
    up, then ``rounds`` timed calls on a batch of ``batch`` grey images."""
    pixels = np.full((batch, image_size, image_size, 3), 128.0, dtype=np.float32)
    rates = {}
    for name, forward in forwards.items():
        forward(pixels)
        started = clock()
        for _ in range(rounds):
            forward(pixels)
        rates[name] = round(rounds * batch / max(clock() - started, 1e-9), 1)
    return rates


def openvino_model(model):
    """The Keras model as an ``openvino.Model`` (any batch size). A model that computes in float32 throughout (what
    CPU training makes) is traced once as a TensorFlow function and converted, its weights copied: the same graph as
    a SavedModel export, to the last bit on ResNet50V2, for a third of the CPU (1.7 s against 5-6 s at 64 px; the
    export writes and reads back every weight). A mixed-precision model (a GPU's training) is exported as a SavedModel
    and converted from disk: OpenVINO's TensorFlow frontend leaves a traced function's bfloat16 casts untyped, and the
    CPU plugin then refuses the model."""
    import openvino as ov  # lazy: OpenVINO's import takes a second, and only a non-Keras runtime needs it
    import tensorflow as tf  # lazy: TensorFlow's import takes seconds

    if computes_in_float32(model):
        call = tf.function(lambda images: model(images, training=False))
        spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], model.inputs[0].dtype)
        return ov.convert_model(call.get_concrete_function(spec), share_weights=False)
    with tempfile.TemporaryDirectory(prefix="xray-openvino-") as folder:
        model.export(folder, format="tf_saved_model", verbose=False)
        return ov.convert_model(folder)


def computes_in_float32(layer) -> bool:
    """Whether the layer and every layer inside it compute in float32 (no mixed-precision policy anywhere)."""
    return layer.compute_dtype == "float32" and all(
        computes_in_float32(inner) for inner in getattr(layer, "layers", [])
    )


def openvino_forwards(model, image_size: int, precision: str, int8_ir: tuple[bytes, bytes] | None = None):
    """(pixels -> probabilities, encoded images -> probabilities) on OpenVINO: the Keras model converted
    (:func:`openvino_model`), or for ``int8`` the version's int8 model (``int8_ir``: its OpenVINO IR, the .xml and
    .bin files' bytes); the encoded variant decodes and resizes with TensorFlow, as training did."""
    import openvino as ov  # lazy: as above
    import tensorflow as tf  # lazy: TensorFlow's import takes seconds

    core = ov.Core()
    if precision == "int8":
        if not int8_ir:
            raise ConfigError("the int8 runtime needs the version's int8 model, and this version has none")
        xml, weights = int8_ir
        int8 = core.read_model(xml.decode(), ov.Tensor(np.frombuffer(weights, dtype=np.uint8).copy()))
        compiled = core.compile_model(int8, "CPU")
    else:
        compiled = core.compile_model(openvino_model(model), "CPU", {"INFERENCE_PRECISION_HINT": precision})

    def forward(batch) -> np.ndarray:
        request = compiled.create_infer_request()  # one per call: serving's threads never share one
        request.infer([np.asarray(batch, dtype=np.float32)])
        return request.get_output_tensor(0).data.copy()

    pixels = tf.function(
        lambda encoded: decode_batch(encoded, image_size), input_signature=[tf.TensorSpec([None], tf.string)]
    )
    return forward, lambda encoded: forward(pixels(encoded).numpy())


def decode_batch(encoded, image_size: int):
    """Encoded images (a string tensor) -> the model's float32 input, with the preprocessing training used; traced
    inside each runtime's compiled call."""
    import tensorflow as tf  # lazy: TensorFlow's import takes seconds

    return tf.map_fn(
        lambda data: tf.cast(decode_and_resize(data, image_size), tf.float32), encoded, fn_output_signature=tf.float32
    )


def label_for(probability: float, threshold: float, status: str) -> str:
    """NORMAL or PNEUMONIA at the threshold for an image whose status is ``ok``; empty for any other status."""
    return CLASS_NAMES[int(probability >= threshold)] if status == ood.OK else ""


@dataclass
class PreparedImage:
    """One image screened for the model: the decoder's reason when unreadable, else its out-of-distribution features
    and the encoded bytes the model decodes (a BMP copy when the original had to be converted)."""

    reason: str = ""
    features: ood.ImageFeatures | None = None
    encoded: bytes | None = None
    header: DicomHeader | None = None
    scope: ScopeResult | None = None

    @property
    def readable(self) -> bool:
        return self.encoded is not None


class ChestXrayPredictor:
    """The one prediction path: image bytes -> probability, label, and whether the image is like the training data."""

    def __init__(
        self,
        model,
        threshold: float,
        image_size: int,
        version: str | None = None,
        profile: ood.ReferenceProfile | None = None,
        scope: ScopeConfig | None = None,
        operating_points: dict[str, dict] | None = None,
    ):
        import tensorflow as tf  # lazy: TensorFlow's import takes seconds

        self.model, self.threshold, self.image_size, self.version = model, threshold, image_size, version
        self.profile = profile
        self.scope = scope or ScopeConfig()
        self.operating_points = dict(operating_points or {})
        """{site: {"calibration": {temperature, bias, ...}, "threshold": t, ...}}: sites' own operating points."""
        self.site: str | None = None
        """The site whose operating point :meth:`table` uses when none is given (batch inference's ``--site``)."""
        self.runtime = "keras f32"
        """What the model runs on (:meth:`use_runtime`); Grad-CAM and evaluation always use the Keras model."""
        self.runtime_rates: dict[str, float] = {}
        """Where :meth:`use_runtime` measured two runtimes on this machine: images/s of each."""
        self.int8_ir: tuple[bytes, bytes] | None = None
        """The version's int8 model, where it carries one: its OpenVINO IR (.xml, .bin) in memory, read with the rest
        of the version's folder (:func:`xray.serving.bundle.read`), which need not outlive the load."""
        self.use_limits(DecodeLimits())
        # Traced once for every batch size: a call pays for the arithmetic, not model.predict's per-call setup (data
        # adapter, callbacks, a step function per shape). The encoded variant also decodes and resizes inside the
        # graph, on TensorFlow's threads, with the preprocessing training used.
        self._forward = tf.function(
            lambda batch: model(batch, training=False),
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)],
        )

        self._forward_encoded = tf.function(
            lambda encoded: model(decode_batch(encoded, image_size), training=False),
            input_signature=[tf.TensorSpec([None], tf.string)],
        )

    def use_runtime(self, setting: str = "auto") -> str:
        """Run :meth:`probabilities` and :meth:`table` on ``setting``'s runtime (:func:`runtime_candidates`; of two,
        the faster in a warm-up on this machine, its rates in ``runtime_rates`` and the log); its name."""
        candidates = runtime_candidates(setting, has_int8=self.int8_ir is not None)
        built = {
            f"{runtime} {precision}": openvino_forwards(self.model, self.image_size, precision, self.int8_ir)
            for runtime, precision in candidates
            if runtime == "openvino"
        }
        self.runtime_rates = {}
        if len(built) > 1:
            self.runtime_rates = warm_up_rates({name: pair[0] for name, pair in built.items()}, self.image_size)
            name = max(self.runtime_rates, key=self.runtime_rates.__getitem__)
        else:
            name = " ".join(candidates[0])
        if name in built:
            self._forward, self._forward_encoded = built[name]
        self.runtime = name
        measured = f", measured images/s {self.runtime_rates}" if self.runtime_rates else ""
        logger.info("inference runtime: %s (setting %s%s)", self.runtime, setting, measured)
        return self.runtime

    def use_limits(self, limits: DecodeLimits) -> None:
        """Decode under ``limits`` (inference.decode; serving's XRAY_SERVING_* variables), with one budget of pixels
        decoded at once for every thread of this predictor."""
        self.limits, self.budget = limits, PixelBudget(limits.max_decoding_pixels)

    def pixels(self, data: bytes) -> np.ndarray:
        """The model's input for one image, through the preprocessing training used."""
        import tensorflow as tf  # lazy: TensorFlow's import takes seconds

        return decode_and_resize(tf.constant(data), self.image_size).numpy().astype(np.float32)

    def prepare(self, data: bytes, allowance: PixelBudget | None = None) -> PreparedImage:
        """Decode once for the check, the scope (a DICOM header) and the out-of-distribution features; the model
        decodes its own copy. Whatever goes wrong with this one image is its reason (named by kind: a decoder's own
        message could quote the file), never the caller's exception. ``allowance``: a request's pixels
        (``max_request_pixels``)."""
        try:
            check, image = decode_image(data, limits=self.limits, admit=lambda pixels: self._admit(pixels, allowance))
            if not check.ok:
                return PreparedImage(reason=check.reason, header=check.header)
            return PreparedImage(
                features=ood.features_of(image, (check.width, check.height)),
                encoded=check.converted or data,
                header=check.header,
                scope=scope.check(check.header, self.scope),
            )
        except RecursionError:
            return PreparedImage(reason="cannot decode: nested too deeply (RecursionError)")
        except MemoryError:
            return PreparedImage(reason="cannot decode: it does not fit in memory")
        except Exception as error:  # noqa: BLE001 - one file's failure is that file's row
            logger.warning("an image could not be decoded: %s", type(error).__name__)
            return PreparedImage(reason=f"cannot decode: {type(error).__name__}")

    @contextmanager
    def _admit(self, pixels: int, allowance: PixelBudget | None):
        if allowance is not None and not allowance.take(pixels):
            raise OverLimit(
                f"over max_request_pixels: this request's images declare more than {allowance.total} pixels "
                "together; send this one in another request"
            )
        with self.budget.hold(pixels):
            yield

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """P(PNEUMONIA) for a batch of preprocessed images (N, size, size, 3)."""
        if len(batch) == 0:
            return np.zeros(0)
        return np.asarray(self._forward(np.asarray(batch, dtype=np.float32))).reshape(-1).astype(float)

    def probabilities_of_encoded(self, images: list[bytes]) -> np.ndarray:
        """P(PNEUMONIA) for encoded images (JPEG or PNG bytes): decode, resize and model in one compiled call."""
        if not images:
            return np.zeros(0)
        import tensorflow as tf  # lazy: TensorFlow's import takes seconds

        return np.asarray(self._forward_encoded(tf.constant(images, dtype=tf.string))).reshape(-1).astype(float)

    def assess(self, features: list[ood.ImageFeatures]) -> pd.DataFrame:
        """ood_score, status and reason per readable image; without a profile every image is ok, unscored."""
        if self.profile is not None:
            return self.profile.assess(features)
        unscored = dict.fromkeys(ood.SCORE_COLUMNS, [float("nan")] * len(features))
        return pd.DataFrame(unscored | {"status": ood.OK, "reason": ""})

    def operating_point(self, site: str | None) -> tuple[str, float, dict | None]:
        """(name, threshold, calibration) of ``site``'s operating point; no site: the version's. A site the version has
        no operating point for is an error, never a silent fall back to the version's."""
        if not site:
            return VERSION_OPERATING_POINT, self.threshold, None
        if site not in self.operating_points:
            known = ", ".join(sorted(self.operating_points)) or "none"
            raise ConfigError(
                f"model version {self.version} has no operating point for site {site!r} (it has: {known}); train with "
                "the site's labelled data or run --pipeline evaluation --recalibrate-fraction on it, or leave --site out"
            )
        point = self.operating_points[site]
        return f"site:{site}", float(point["threshold"]), Calibration(**point["calibration"])

    def table(self, prepared: list[PreparedImage], site: str | None = None) -> pd.DataFrame:
        """One row per prepared image, in order (OUTPUT_COLUMNS): the readable ones through the model in one call, at
        ``site``'s operating point (default :attr:`site`; none: the version's)."""
        site = site or self.site
        point, threshold, calibration = self.operating_point(site)
        readable = [item for item in prepared if item.readable]
        probabilities = self.probabilities_of_encoded([item.encoded for item in readable])
        if calibration is not None and len(probabilities):
            # The site's calibration composes with the version's: it was fitted on the logit of these probabilities.
            probabilities = calibration.probability(logit(probabilities))
        assessment = self.assess([item.features for item in readable])
        table = pd.DataFrame(
            {
                "probability": np.nan,
                "label": "",
                "threshold": threshold,
                **dict.fromkeys(ood.SCORE_COLUMNS, np.nan),
                "status": ood.UNREADABLE,
                "reason": [item.reason for item in prepared],
                "scope_unchecked": [",".join(item.scope.unchecked) if item.scope else "" for item in prepared],
                **{
                    column: [getattr(item.header, column) if item.header else "" for item in prepared]
                    for column in UID_COLUMNS
                },
                "site": site or "",
                "operating_point": point,
                "model_version": self.version,
                "runtime": self.runtime,
            },
            columns=OUTPUT_COLUMNS,
        )
        mask = np.array([item.readable for item in prepared], dtype=bool)
        if mask.any():
            status = assessment["status"].to_numpy(dtype=object)
            reason = assessment["reason"].to_numpy(dtype=object)
            for index, item in enumerate(readable):
                # Out of scope comes first: the header is a fact, the pixel check a statistic; both are said.
                if not item.scope.in_scope:
                    pixels = (
                        f"; out of distribution: {reason[index]}" if status[index] == ood.OUT_OF_DISTRIBUTION else ""
                    )
                    status[index], reason[index] = OUT_OF_SCOPE, item.scope.reason + pixels
            table.loc[mask, "probability"] = probabilities
            for column in ood.SCORE_COLUMNS:
                table.loc[mask, column] = assessment[column].to_numpy()
            table.loc[mask, "status"] = status
            table.loc[mask, "reason"] = reason
            table.loc[mask, "label"] = [label_for(p, threshold, st) for p, st in zip(probabilities, status)]
        return table

    def predict_bytes(self, images: list[bytes], site: str | None = None) -> pd.DataFrame:
        """One row per image, in order; an image that cannot be decoded gets status unreadable and no probability."""
        self.operating_point(site)  # an unknown site fails before any image is decoded
        allowance = PixelBudget(self.limits.max_request_pixels)
        table = self.table([self.prepare(data, allowance) for data in images], site)
        # JSON has no NaN: an unreadable image has no probability and no score, null in the answer.
        return table.astype(object).where(table.notna(), None)
