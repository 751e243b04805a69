"""The registered version a run uses, pinned once for every step of it."""

import logging
from typing import Annotated

from zenml import log_metadata, step

from xray.config.registry import RegistryConfig
from xray.registry import store

logger = logging.getLogger(__name__)


# Not cached: an alias such as champion can move between runs.
@step(enable_cache=False, experiment_tracker=True)
def resolve_model_version(model_version: str, registry: RegistryConfig) -> Annotated[store.ModelInfo, "model_info"]:
    """Pin an alias such as champion to its version number, so every step of this run uses the same version."""
    info = store.resolve_version(registry.model_name, model_version)
    logger.info("using %s (%s)", info.uri, model_version)
    return info


def load(info: store.ModelInfo, model_name: str, runtime: str | None = None):
    """The version's predictor (its files checked against its digest), on ``runtime`` (inference.runtime) where
    given; Grad-CAM keeps the Keras model."""
    predictor, _ = store.load_predictor(model_name, info.version)
    if runtime is not None:
        predictor.use_runtime(runtime)
    log_metadata(metadata={"model_uri": info.uri, "model_version": info.version})
    return predictor
