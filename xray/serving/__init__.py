"""Serving: one prediction path (predictor) and its transports, REST (pyfunc) and batch; the version folder (bundle).
May use core, storage, data, model, evaluation and monitoring."""


def __getattr__(name: str):
    """Versions registered before the stages name "xray.serving" as their pyfunc loader module: MLflow asks this
    package for ``_load_pyfunc``, which comes from :mod:`xray.serving.pyfunc` when asked for, not on every import of
    a serving module (pyfunc imports the monitoring stage's detector, with scikit-learn and pandas: 3 s of CPU that
    the DICOM node's build processes, which never answer a request, paid at each start)."""
    if name == "_load_pyfunc":
        from xray.serving.pyfunc import _load_pyfunc

        return _load_pyfunc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
