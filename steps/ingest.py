import logging
import tempfile
from pathlib import Path
from typing import Annotated, Optional, Tuple

import mlflow
from zenml import step

from materializers import RawArchiveMaterializer
from steps.tracking import log_config, mlflow_run
from xray.config import S3Config
from xray.ingest import RawArchive, fetch

logger = logging.getLogger(__name__)


# Never cached itself: the object behind a URI can change. The archive's SHA-256
# is its content hash, so every step downstream is cached by content instead.
@step(enable_cache=False, output_materializers={"raw_archive": RawArchiveMaterializer}, experiment_tracker=True)
def ingest_from_s3(
    dataset_uri: str,
    s3: S3Config,
    expected_sha256: Optional[str] = None,
) -> Tuple[Annotated[RawArchive, "raw_archive"], Annotated[dict, "archive_info"]]:
    """Download the dataset archive (or read a local one) and checksum it."""
    archive = fetch(dataset_uri, Path(tempfile.mkdtemp(prefix="xray-ingest-")), s3, expected_sha256)
    logger.info(f"ingested {archive.source_uri}: {archive.size / 2**20:.1f} MiB, sha256 {archive.sha256}")
    with mlflow_run():
        log_config(s3=s3, dataset_uri=dataset_uri, expected_sha256=str(expected_sha256))
        mlflow.log_params({f"dataset.{k}": v for k, v in archive.metadata().items()})
    return archive, archive.metadata()
