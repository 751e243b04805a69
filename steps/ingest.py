import logging
from typing import Annotated, Optional, Tuple

import mlflow
from zenml import step

from materializers import RawArchiveMaterializer
from steps.scratch import output_folder
from steps.tracking import log_config, mlflow_run
from xray.config import DataConfig, S3Config
from xray.data.sites import identify_source
from xray.storage.fetch import RawArchive, fetch, locate

logger = logging.getLogger(__name__)


# Never cached: the object behind a URI can change. Cheap (an S3 HEAD, or hashing a local file).
@step(enable_cache=False, experiment_tracker=True)
def locate_archive(
    dataset_uri: str, s3: S3Config, expected_sha256: Optional[str] = None
) -> Annotated[dict, "archive_identity"]:
    """What the archive is right now: S3 ETag and size, or a local file's SHA-256 and size."""
    identity = locate(dataset_uri, s3)
    logger.info("archive %s", identity)
    with mlflow_run():
        log_config(s3=s3, dataset_uri=dataset_uri, expected_sha256=str(expected_sha256))
        mlflow.log_params({f"dataset.{key}": value for key, value in identity.items()})
    return identity


# Cached on the identity (a dict's content hash): a retraining on the same object reuses the stored archive instead
# of storing it again, and the archive's SHA-256 is its own content hash, so every step downstream is cached by
# content too.
@step(output_materializers={"raw_archive": RawArchiveMaterializer}, experiment_tracker=True)
def ingest_from_s3(
    archive_identity: dict,
    s3: S3Config,
    expected_sha256: Optional[str] = None,
) -> Tuple[Annotated[RawArchive, "raw_archive"], Annotated[dict, "archive_info"]]:
    """Download the dataset archive (or read a local one), checksum it, and check it is the object located."""
    uri = archive_identity["source_uri"]
    archive = fetch(uri, output_folder("raw_archive"), s3, expected_sha256, archive_identity)
    logger.info(f"ingested {archive.source_uri}: {archive.size / 2**20:.1f} MiB, sha256 {archive.sha256}")
    if "sha256" not in archive_identity:  # an S3 object without our checksum metadata: known only now
        with mlflow_run():
            mlflow.log_param("dataset.sha256", archive.sha256)
    return archive, archive.metadata()


# Never cached, like locate_archive: a folder or an object behind a URI can change. It reads each source once (a
# folder's files are hashed), so the prepare step is cached on the sources' content.
@step(enable_cache=False, experiment_tracker=True)
def locate_sources(data: DataConfig, s3: S3Config) -> Annotated[dict, "source_identities"]:
    """What each of the other training sources (data.sources) is right now: its content digest, site and URIs."""
    identities = {source.site: identify_source(source, s3) for source in data.extra_sources}
    for site, identity in identities.items():
        logger.info("source %s: %s, digest %s", site, identity["uri"], identity["digest"][:16])
    if identities:
        with mlflow_run():
            mlflow.log_params({f"source.{site}.digest": identity["digest"] for site, identity in identities.items()})
    return identities
