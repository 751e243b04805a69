import logging
import tempfile
from pathlib import Path
from typing import Annotated, Optional, Tuple

import mlflow
from zenml import log_metadata, step

from materializers import FiguresMaterializer, ValidatedDatasetMaterializer
from steps.caching import DOMAIN_CODE
from steps.scratch import output_folder
from steps.tracking import log_config, log_images, log_sources, mlflow_run
from xray.config.data import DataConfig
from xray.config.s3 import S3Config
from xray.data.dataset import ValidatedDataset, add_sources, prepare_dataset
from xray.data.manifest import DataReport
from xray.data.sites import SourceIdentities, load_source
from xray.evaluation import plots
from xray.storage.fetch import RawArchive

logger = logging.getLogger(__name__)


@step(
    output_materializers={"dataset": ValidatedDatasetMaterializer, "data_figures": FiguresMaterializer},
    cache_policy=DOMAIN_CODE,
    experiment_tracker=True,
)
def unzip_and_validate(
    raw_archive: RawArchive,
    data: DataConfig,
    seed: int,
    s3: S3Config = S3Config(),
    source_identities: Optional[SourceIdentities] = None,
) -> Tuple[
    Annotated[ValidatedDataset, "dataset"],
    Annotated[DataReport, "data_report"],
    Annotated[plots.Figures, "data_figures"],
]:
    """Safe extraction, full decode, de-duplication and a patient-grouped val split; then the other sources
    (data.sources), each split by its own folders or by patient, duplicates across sources kept once."""
    root = output_folder("dataset")
    dataset, report = prepare_dataset(raw_archive.path, root, data, seed)
    report.sites[data.base_site] |= {
        "uri": raw_archive.source_uri,
        "digest": raw_archive.sha256,
        "etag": raw_archive.etag or "",
    }
    identities = source_identities.sources if source_identities else {}
    with tempfile.TemporaryDirectory(prefix="xray-sources-") as scratch:
        loaded = [
            load_source(source, identities[source.site], root, data, s3, Path(scratch) / source.site)
            for source in data.extra_sources
        ]
    add_sources(dataset, report, loaded)
    for site, entry in report.sites.items():
        logger.info("site %s: %s (splits from %s)", site, entry["counts"], entry["splits_from"])
    # Lineage in ZenML too (the step's metadata in the dashboard): each source's URI, digest and counts.
    log_metadata(
        metadata={
            "sites": {
                site: {k: entry.get(k, "") for k in ("uri", "labels", "digest", "splits_from", "counts")}
                for site, entry in report.sites.items()
            }
        }
    )
    logger.info(
        f"validated {len(dataset.manifest)} images: {report.counts}; val {report.val_source}; "
        f"{len(report.quarantined)} quarantined, {len(report.duplicates_removed)} duplicates removed, "
        f"{report.junk_files} junk files ignored"
    )
    examples = dataset.manifest.groupby(["split", "label"]).head(2)
    figures = {
        "class_distribution": plots.class_distribution(report.counts),
        "sample_grid": plots.sample_grid(
            dataset.paths(examples), [f"{r.split}/{r.label}" for r in examples.itertuples()]
        ),
    }
    with mlflow_run():
        log_config(data=data, seed=seed)
        mlflow.log_metrics(
            {f"data.{s}.{l}": float(n) for s, c in report.counts.items() for l, n in c.items()}
            | {
                "data.quarantined": float(len(report.quarantined)),
                "data.duplicates_removed": float(len(report.duplicates_removed)),
            }
        )
        mlflow.log_dict(report.to_dict(), "data/data_report.json")
        log_sources(report.sites)
        log_images(figures, "data")
    return dataset, report, plots.Figures(figures)
