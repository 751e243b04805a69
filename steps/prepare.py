import logging
from typing import Annotated, Tuple

import mlflow
import pandas as pd
from PIL import Image
from zenml import step

from materializers import ValidatedDatasetMaterializer
from steps.caching import DOMAIN_CODE
from steps.scratch import output_folder
from steps.tracking import log_config, log_images, mlflow_run
from xray.config import DataConfig
from xray.data.dataset import ValidatedDataset, prepare_dataset
from xray.evaluation import plots
from xray.storage.fetch import RawArchive

logger = logging.getLogger(__name__)


@step(output_materializers={"dataset": ValidatedDatasetMaterializer}, cache_policy=DOMAIN_CODE, experiment_tracker=True)
def unzip_and_validate(
    raw_archive: RawArchive, data: DataConfig, seed: int
) -> Tuple[
    Annotated[ValidatedDataset, "dataset"],
    Annotated[pd.DataFrame, "manifest"],
    Annotated[dict, "data_report"],
    Annotated[Image.Image, "class_distribution"],
    Annotated[Image.Image, "sample_grid"],
]:
    """Safe extraction, full decode, de-duplication and a patient-grouped val split."""
    dataset, report = prepare_dataset(raw_archive.path, output_folder("dataset"), data, seed)
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
            {f"data.{s}.{l}": n for s, c in report.counts.items() for l, n in c.items()}
            | {"data.quarantined": len(report.quarantined), "data.duplicates_removed": len(report.duplicates_removed)}
        )
        mlflow.log_dict(report.to_dict(), "data/data_report.json")
        log_images(figures, "data")
    return dataset, dataset.manifest, report.to_dict(), figures["class_distribution"], figures["sample_grid"]
