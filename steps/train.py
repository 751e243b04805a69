import logging
from pathlib import Path
from typing import Annotated, Tuple

import keras
import mlflow
from PIL import Image
from zenml import step

from materializers import KerasModelMaterializer
from steps.caching import DOMAIN_CODE
from steps.tracking import log_config, log_images, mlflow_run
from xray.config.model import ModelConfig
from xray.config.train import TrainConfig
from xray.data import inputs
from xray.data.dataset import ValidatedDataset, fingerprint
from xray.evaluation import plots
from xray.model import training
from xray.registry import tracking

logger = logging.getLogger(__name__)


@step(output_materializers={"model": KerasModelMaterializer}, cache_policy=DOMAIN_CODE, experiment_tracker=True)
def train_model(
    dataset: ValidatedDataset,
    spec: inputs.DatasetSpec,
    model: ModelConfig,
    train: TrainConfig,
) -> Tuple[
    Annotated[keras.Model, "model"], Annotated[training.History, "history"], Annotated[Image.Image, "training_curves"]
]:
    """Fit the classifier with tf.data pipelines built here, on whatever machine runs this step."""
    checkpoint_dir = None
    if train.backup_dir:
        key = training.checkpoint_key(model, train, spec, fingerprint(dataset.manifest))
        checkpoint_dir = Path(train.backup_dir).expanduser() / key
    with mlflow_run():
        log_config(model=model, train=train)
        classifier, epochs, throughput = training.fit(
            model,
            train,
            spec,
            inputs.fit_datasets(dataset, spec),
            extra_callbacks=[tracking.epoch_logger()],
            checkpoint_dir=checkpoint_dir,
        )
        curves = plots.training_curves(epochs)
        mlflow.log_metrics({f"train_{k}": v for k, v in throughput.items()})
        log_images({"training_curves": curves})
    logger.info(
        f"trained {throughput['epochs_run']} epochs in {throughput['train_seconds']:.0f}s "
        f"({throughput['images_per_second']:.1f} img/s)"
    )
    about = {"backbone": model.backbone, "weights": str(model.weights)} | training.inputs_of(spec)
    return classifier, training.History(epochs, throughput, about), curves
