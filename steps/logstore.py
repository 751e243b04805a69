"""Where the prediction log goes from inside a step: the stack's artifact store (through ZenML, its own endpoint and
credentials), a folder or an s3:// prefix, or nowhere (monitoring.prediction_log); and the audit trail, always on
the stack's artifact store."""

import logging

from zenml.client import Client
from zenml.io import fileio

from xray.monitoring import prediction_log as prediction_log_module
from xray.registry.control import audit

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


class TrailFiles(ArtifactStoreFiles):
    """The audit trail's objects (xray.registry.control.audit) on the stack's artifact store, through ZenML's fileio:
    one object per record under ``<artifact store>/audit/``."""

    def list(self) -> list[str]:
        if not fileio.exists(self.root):
            return []
        return sorted(str(path).rsplit("/", 1)[-1] for path in fileio.glob(f"{self.root}/{audit.PREFIX}*.json"))

    def exists(self, name: str) -> bool:
        return fileio.exists(f"{self.root}/{name}")

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"


def audit_trail() -> audit.Trail:
    """The active stack's audit trail: ``<artifact store>/audit`` (a local folder, or S3 on the team stack)."""
    return audit.Trail(TrailFiles(Client().active_stack.artifact_store.path.rstrip("/") + "/audit"))
