import logging
from typing import Annotated

import mlflow
from zenml import step

from steps.caching import DOMAIN_CODE
from steps.tracking import mlflow_run
from xray.config.data import DataConfig
from xray.config.model import ModelConfig
from xray.config.train import TrainConfig
from xray.data import inputs
from xray.data.dataset import ValidatedDataset

logger = logging.getLogger(__name__)


@step(cache_policy=DOMAIN_CODE, experiment_tracker=True)
def build_datasets(
    dataset: ValidatedDataset,
    data: DataConfig,
    model: ModelConfig,
    train: TrainConfig,
    seed: int,
) -> Annotated[inputs.DatasetSpec, "dataset_spec"]:
    """Class weights and the input-pipeline spec; one batch is decoded to fail early."""
    spec = inputs.spec_from_config(dataset.manifest, data, model, train, seed)
    rows = inputs.select(dataset.manifest, "train", spec)
    images = next(iter(inputs.make_dataset(dataset.paths(rows), inputs.labels_of(rows), spec, training=True)))[0]
    logger.info(
        f"input pipeline ok: batch {tuple(images.shape)}; class weights {spec.class_weights}; selected {spec.counts}"
    )
    with mlflow_run():
        mlflow.log_params({f"class_weight.{k}": round(v, 4) for k, v in spec.class_weights.items()})
        mlflow.log_params({f"selected.{s}.{l}": n for s, c in spec.counts.items() for l, n in c.items()})
    return spec
