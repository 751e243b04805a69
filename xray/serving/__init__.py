"""Serving: one prediction path (predictor) and its transports, REST (pyfunc) and batch; the version folder (bundle).
May use core, storage, data, model, evaluation and monitoring."""

# Versions registered before the stages name "xray.serving" as their pyfunc loader module: it must still load them.
from xray.serving.pyfunc import _load_pyfunc  # noqa: F401
