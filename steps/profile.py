import logging
from typing import Annotated

import mlflow
from zenml import step

from materializers import ReferenceProfileMaterializer
from steps.caching import DOMAIN_CODE
from steps.tracking import log_config, mlflow_run
from xray.config.monitoring import MonitoringConfig
from xray.data import inputs
from xray.data.dataset import ValidatedDataset
from xray.evaluation.recipes import Evaluation
from xray.monitoring import ood

logger = logging.getLogger(__name__)


@step(
    output_materializers={"reference_profile": ReferenceProfileMaterializer},
    cache_policy=DOMAIN_CODE,
    experiment_tracker=True,
)
def profile_reference(
    dataset: ValidatedDataset,
    spec: inputs.DatasetSpec,
    evaluation: Evaluation,
    monitoring: MonitoringConfig,
    seed: int,
) -> Annotated[ood.ReferenceProfile, "reference_profile"]:
    """What train and val look like, with the out-of-distribution threshold chosen on val only."""
    train_rows, val_rows = (inputs.select(dataset.manifest, s, spec) for s in ("train", "val"))
    train = ood.features_of_files(dataset.paths(train_rows))
    val = ood.features_of_files(dataset.paths(val_rows))
    labels = inputs.labels_of(val_rows)
    profile = ood.fit_profile(train, val, evaluation.p_val, evaluation.threshold, monitoring, seed, val_labels=labels)
    logger.info(
        "reference profile: %d train, %d val images; out-of-distribution threshold %.3f flags %.1f%% of val",
        len(train),
        len(val),
        profile.threshold,
        100 * profile.val_ood_fraction,
    )
    with mlflow_run():
        log_config(monitoring=monitoring)
        mlflow.log_metrics(
            {
                "ood_threshold": profile.threshold,
                "val_ood_fraction": profile.val_ood_fraction,
                "val_positive_rate": profile.val_positive_rate,
            }
        )
    return profile
