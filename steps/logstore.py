"""Where the prediction log goes from inside a step: the stack's artifact store (through ZenML, its own endpoint and
credentials), a folder or an s3:// prefix, or nowhere (monitoring.prediction_log)."""

import logging

from zenml.client import Client
from zenml.io import fileio

from xray.monitoring import prediction_log as prediction_log_module

logger = logging.getLogger(__name__)


class ArtifactStoreFiles:
    """The prediction log's parts through ZenML's fileio: the artifact store's own endpoint and credentials."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def write(self, relative: str, data: bytes) -> None:
        path = f"{self.root}/{relative}"
        fileio.makedirs(path.rsplit("/", 1)[0])
        with fileio.open(path, "wb") as handle:
            handle.write(data)

    def list(self) -> list[str]:
        if not fileio.exists(self.root):
            return []
        found = fileio.glob(f"{self.root}/date=*/*.parquet")
        return sorted(str(path)[str(path).rindex("date=") :] for path in found)

    def read(self, relative: str) -> bytes:
        with fileio.open(f"{self.root}/{relative}", "rb") as handle:
            return handle.read()


def log_store(setting: str) -> tuple[str, object] | None:
    """monitoring.prediction_log resolved to (root, store): artifact-store is <the active stack's artifact
    store>/prediction_log, written through ZenML; a folder or an s3:// prefix is written directly; off is None."""
    if setting == prediction_log_module.OFF:
        return None
    if setting == "artifact-store":
        root = Client().active_stack.artifact_store.path.rstrip("/") + "/prediction_log"
        return root, ArtifactStoreFiles(root)
    return setting, prediction_log_module.open_store(setting)


def prediction_log(setting: str, images: str) -> prediction_log_module.PredictionLog | None:
    resolved = log_store(setting)
    if resolved is None:
        return None
    root, store = resolved
    logger.info("logging every prediction to %s", prediction_log_module.without_credentials(root))
    return prediction_log_module.PredictionLog(root, "batch", images, store=store)
