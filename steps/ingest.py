import logging
from typing import Annotated, Optional

import mlflow
from zenml import step

from materializers import RawArchiveMaterializer
from steps.scratch import output_folder
from steps.tracking import log_config, mlflow_run
from xray.config.data import DataConfig
from xray.config.s3 import S3Config
from xray.data.sites import SourceIdentities, identify_sources
from xray.storage.fetch import ArchiveIdentity, RawArchive, fetch, locate

logger = logging.getLogger(__name__)


# Never cached: the object behind a URI can change. Cheap (an S3 HEAD, or hashing a local file).
@step(enable_cache=False, experiment_tracker=True)
def locate_archive(
    dataset_uri: str, s3: S3Config, expected_sha256: Optional[str] = None
) -> Annotated[ArchiveIdentity, "archive_identity"]:
    """What the archive is right now: S3 ETag and size, or a local file's SHA-256 and size."""
    identity = locate(dataset_uri, s3)
    logger.info("archive %s", identity)
    with mlflow_run():
        log_config(s3=s3, dataset_uri=dataset_uri, expected_sha256=str(expected_sha256))
        mlflow.log_params({f"dataset.{key}": value for key, value in identity.items()})
    return ArchiveIdentity(**identity)


# Cached on the identity (its content hash): a retraining on the same object reuses the stored archive instead of
# storing it again, and the archive's SHA-256 is its own content hash, so every step downstream is cached by content.
@step(output_materializers={"raw_archive": RawArchiveMaterializer}, experiment_tracker=True)
def ingest_from_s3(
    archive_identity: ArchiveIdentity, s3: S3Config, expected_sha256: Optional[str] = None
) -> Annotated[RawArchive, "raw_archive"]:
    """Download the dataset archive (or read a local one), checksum it, and check it is the object located."""
    identity = archive_identity.as_dict()
    archive = fetch(archive_identity.source_uri, output_folder("raw_archive"), s3, expected_sha256, identity)
    logger.info(f"ingested {archive.source_uri}: {archive.size / 2**20:.1f} MiB, sha256 {archive.sha256}")
    if archive_identity.sha256 is None:  # an S3 object without our checksum metadata: known only now
        with mlflow_run():
            mlflow.log_param("dataset.sha256", archive.sha256)
    return archive


# Never cached, like locate_archive: a folder or an object behind a URI can change. It reads each source once (a
# folder's files are hashed), so the prepare step is cached on the sources' content.
@step(enable_cache=False, experiment_tracker=True)
def locate_sources(data: DataConfig, s3: S3Config) -> Annotated[SourceIdentities, "source_identities"]:
    """What each of the other training sources (data.sources) is right now: its content digest, site and URIs."""
    identities = identify_sources(data, s3)
    for site, identity in identities.sources.items():
        logger.info("source %s: %s, digest %s", site, identity["uri"], identity["digest"][:16])
    if identities.sources:
        with mlflow_run():
            mlflow.log_params({f"source.{site}.digest": i["digest"] for site, i in identities.sources.items()})
    return identities
