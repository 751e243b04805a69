"""MLflow pyfunc flavor of the registered model: base64 image bytes in, one row per image out.

``mlflow models serve`` and ``mlflow.pyfunc.load_model`` call :func:`_load_pyfunc` with the version's ``data``
folder (:mod:`xray.serving.bundle`). Request body for ``POST /invocations``::

    {"inputs": ["<base64 JPEG or PNG>", ...]}
    {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}
    {"inputs": [...], "params": {"site": "NAME"}}    (at that site's own operating point, when the version has one)

Each image gets ``probability``, ``label``, ``threshold``, ``ood_score`` (1.0 is the out-of-distribution boundary),
its parts ``content_z`` and ``acquisition_z``, ``status`` (``ok``, ``out_of_distribution`` or ``unreadable``) and
``reason``. ``label`` is empty for every status but ``ok``: an out-of-distribution image keeps its probability and
score, but gets no label. ``model_version`` is the version that answered; ``site`` and ``operating_point`` say whose
calibration and threshold the answer is at (``version`` or ``site:<name>``); a site the version has no operating
point for is a 400 that lists the ones it has.

Requests are refused with a 400 and a message, never a 500: a body that is not JSON, a payload that is not one base64
string per image (``{"inputs": {...}}``, nested lists, numbers), an empty list, a request in which no image can be
read, more than ``MAX_IMAGES_PER_REQUEST`` images, or more than ``MAX_REQUEST_MB`` of image data (set with
``XRAY_SERVING_MAX_REQUEST_MB``). One image that cannot be read, or is over a decode limit
(:class:`xray.config.limits.DecodeLimits`, from ``XRAY_SERVING_MAX_IMAGE_PIXELS``, ``..._MAX_NESTING``,
``..._MAX_DECODING_PIXELS``, ``..._MAX_REQUEST_PIXELS``), is its own ``unreadable`` row; the others are answered.
An error's body is its reason alone: never the request (MLflow's own error path quotes the whole payload, so
:func:`guard_scoring_server` answers first) and never a stack trace. The scoring server reads the whole body before
the model sees it; a hard cap on bytes on the wire belongs in the proxy in front (nginx ``client_max_body_size``, an
ALB or API Gateway limit).

With ``XRAY_PREDICTION_LOG`` set (a folder or an s3:// prefix; ``make serve`` sets the stack's), every answer is also
appended to the prediction log (xray.monitoring.prediction_log) by a background thread, with each image's sha256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import sys

import numpy as np
import pandas as pd

from xray.config.limits import DecodeLimits
from xray.errors import ConfigError
from xray.monitoring import prediction_log
from xray.monitoring.ood import UNREADABLE
from xray.serving import bundle
from xray.serving.predictor import ChestXrayPredictor

logger = logging.getLogger(__name__)
MAX_IMAGES_PER_REQUEST = 64
MAX_REQUEST_MB = float(os.environ.get("XRAY_SERVING_MAX_REQUEST_MB", "16"))
SHAPE_HELP = 'send {"inputs": ["<base64 image>", ...]}: one base64 string per image'


class InvalidImage(ValueError):
    pass


def _payload_items(model_input) -> list:
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            return list(model_input["image"])
        if model_input.shape[1] != 1:
            raise InvalidImage(f"expected one image column, got columns {_names(model_input.columns)}; {SHAPE_HELP}")
        return list(model_input.iloc[:, 0])
    if isinstance(model_input, dict):
        for key in ("image", "inputs"):
            if key in model_input:
                return _payload_items(model_input[key])
        if len(model_input) == 1:
            return _payload_items(next(iter(model_input.values())))
        raise InvalidImage(
            f"expected a list of images, got an object with keys {_names(sorted(model_input))}; {SHAPE_HELP}"
        )
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    array = np.asarray(model_input, dtype=object)
    if array.ndim != 1:
        raise InvalidImage(f"expected a flat list of images, got an array of shape {array.shape}; {SHAPE_HELP}")
    return list(array)


def _names(names) -> list[str]:
    """A request's own keys as an error may quote them: five at most, 40 characters each."""
    return [str(name)[:40] for name in list(names)[:5]]


def decode_payload(item, index: int = 0) -> bytes:
    if isinstance(item, bytes):
        return item
    if not isinstance(item, str):
        raise InvalidImage(f"image {index} is a {type(item).__name__}, not a base64 string; {SHAPE_HELP}")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidImage(f"image {index} is not base64-encoded image bytes: {error}") from None


def check_request_size(items: list) -> None:
    """Refuse a request over the documented limits before decoding any image."""
    if not items:
        raise InvalidImage(f"no images in the request; {SHAPE_HELP}")
    if len(items) > MAX_IMAGES_PER_REQUEST:
        raise InvalidImage(
            f"{len(items)} images in one request, over the limit of {MAX_IMAGES_PER_REQUEST}; split the batch"
        )
    size = sum(len(item) for item in items if isinstance(item, (str, bytes)))
    if size > MAX_REQUEST_MB * 2**20:
        raise InvalidImage(
            f"{size / 2**20:.1f} MB of image data in one request, over the limit of {MAX_REQUEST_MB:g} MB "
            "(XRAY_SERVING_MAX_REQUEST_MB); send fewer or smaller images"
        )


def predict_request(
    predictor: ChestXrayPredictor, model_input, site: str | None = None, hashes: list | None = None
) -> pd.DataFrame:
    """One row per image of a request; InvalidImage when the request is malformed, names a site the version has no
    operating point for, or no image in it can be read. ``hashes``: filled with each image's sha256."""
    items = _payload_items(model_input)
    check_request_size(items)
    if site is not None and not isinstance(site, str):
        raise InvalidImage(f"params.site must be a site name, not {type(site).__name__}")
    try:
        predictor.operating_point(site or None)
    except ConfigError as error:
        raise InvalidImage(str(error)) from None
    payloads = [decode_payload(item, index) for index, item in enumerate(items)]
    table = predictor.predict_bytes(payloads, site or None)
    if hashes is not None:
        hashes.extend(hashlib.sha256(data).hexdigest() for data in payloads)
    if (table["status"] == UNREADABLE).all():
        raise InvalidImage(
            "; ".join(f"image {i} cannot be decoded as an image: {reason}" for i, reason in enumerate(table["reason"]))
        )
    return table


class _PyfuncModel:
    """What mlflow.pyfunc wraps; turns bad input into a 400, not a 500; logs every answer (XRAY_PREDICTION_LOG)."""

    def __init__(self, predictor: ChestXrayPredictor, log: prediction_log.BackgroundLog | None = None):
        self.predictor = predictor
        self.log = log

    def predict(self, model_input, params=None):
        hashes: list[str] = []
        try:
            table = predict_request(self.predictor, model_input, (params or {}).get("site"), hashes)
        except InvalidImage as error:
            raise refusal(str(error)) from None
        if self.log is not None:
            self.log.append(table, sha256=hashes, path=[""] * len(hashes))
        return table


def refusal(reason: str):
    """A 400 whose body is ``reason`` (an MlflowException that :func:`guard_scoring_server` recognises)."""
    from mlflow.exceptions import MlflowException  # lazy: the module also loads where MLflow is not imported
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE  # lazy: MLflow's import takes seconds

    error = MlflowException(reason, error_code=INVALID_PARAMETER_VALUE)
    error.xray_reason = reason
    return error


def answer_of(error: Exception) -> tuple[int, str, str]:
    """(HTTP status, error code, message) for an error of the scoring server's ``invocations``: ours as it is,
    MLflow's own by its kind (MLflow's text quotes the request), and anything unexpected (MLflow wraps it with a stack
    trace) as a 500 that names its type alone."""
    reason = getattr(error, "xray_reason", None)
    if reason is not None:
        return 400, "INVALID_PARAMETER_VALUE", reason
    cause = error.__cause__ or error.__context__
    if isinstance(cause, json.JSONDecodeError):
        return 400, "BAD_REQUEST", f"the request body is not JSON ({cause.msg} at character {cause.pos}); {SHAPE_HELP}"
    status = getattr(error, "get_http_status_code", lambda: 500)()
    if status < 500 and "stack_trace" not in getattr(error, "json_kwargs", {}):
        kind = "not UTF-8" if isinstance(cause, UnicodeDecodeError) else "not a request the model takes"
        return status, getattr(error, "error_code", "BAD_REQUEST"), f"the request body is {kind}; {SHAPE_HELP}"
    kind = type(cause or error).__name__
    logger.error("serving failed to answer a request: %s", kind)
    return 500, "INTERNAL_ERROR", f"the server failed to answer this request ({kind})"


def guard_scoring_server() -> None:
    """Answer every error of MLflow's scoring server before its own error path, with :func:`answer_of`.

    MLflow 3's ``invocations`` re-raises a model's MlflowException as ``Failed to predict data '<the whole
    request>'``, quotes a body it cannot parse as JSON, and puts a stack trace into the body of any other error: the
    image bytes (a patient's) or a trace would reach the client and every gateway log on the way. ``invocations`` is
    looked up at each request (mlflow.pyfunc.scoring_server.init), so wrapping it where the model loads, in the
    server's own process, puts this answer in front."""
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    if server is None or getattr(server.invocations, "guarded", False):
        return
    original = server.invocations

    def invocations(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - every error answers with its reason alone
            status, code, message = answer_of(error)
            body = json.dumps({"error_code": code, "message": message})
            return server.InvocationsResponse(response=body, status=status, mimetype="application/json")

    invocations.guarded = True
    server.invocations = invocations


def _load_pyfunc(data_path: str) -> _PyfuncModel:
    predictor = bundle.read(data_path)
    predictor.use_runtime("auto")  # XRAY_INFERENCE_RUNTIME overrides it (xray.serving.predictor.runtime_candidates)
    predictor.use_limits(DecodeLimits.from_environment())
    guard_scoring_server()
    return _PyfuncModel(predictor, prediction_log.from_environment())
