"""xray.evaluation.evaluate_model, the training pipeline's evaluation recipe, on a tiny model and synthetic images."""

import numpy as np
import pytest

from support import dataset_entries
from xray.config.data import DataConfig
from xray.config.evaluate import EvaluateConfig
from xray.config.model import ModelConfig
from xray.config.train import Augmentation
from xray.data import inputs
from xray.data.dataset import prepare_dataset
from xray.evaluation.recipes import evaluate_model

pytestmark = pytest.mark.slow  # builds a ResNet50V2 and runs the whole recipe on it


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from support import write_zip
    from xray.model.network import build_model

    folder = tmp_path_factory.mktemp("evaluation")
    archive = write_zip(folder / "a.zip", dataset_entries(per_class=12))
    dataset, _ = prepare_dataset(archive, folder / "d", DataConfig(min_val_per_class=3, val_fraction=0.25), seed=0)
    spec = inputs.make_spec(dataset.manifest, 32, 8, Augmentation(), None, None, 0, "balanced")
    model, _ = build_model(ModelConfig(image_size=32, dense_units=4), None)
    config = EvaluateConfig(bootstrap_samples=100, calibration="temperature")
    return evaluate_model(model, dataset, spec, config, seed=0), dataset, spec


def test_the_recipe_reports_calibrated_test_metrics_and_figures(evaluated):
    result, dataset, spec = evaluated
    counts = {s: len(inputs.select(dataset.manifest, s, spec)) for s in ("val", "test")}
    assert result.p_val.shape == (counts["val"],) and result.p_test.shape == (counts["test"],)
    assert np.all((result.p_test >= 0) & (result.p_test <= 1)) and 0 <= result.threshold <= 1
    flat = result.report["flat"]
    assert {"test_auc", "test_ece", "test_ece_uncalibrated", "val_auc", "threshold"} <= flat.keys()
    assert flat["threshold"] == result.threshold and result.report["calibration"]["method"] == "temperature"
    assert set(result.figures) == {"roc_pr_curves", "confusion_matrix", "calibration", "gradcam_test_examples"}
    assert all(image.size[0] > 100 and image.size[1] > 100 for image in result.figures.values())


def test_the_calibrated_model_outputs_the_reported_probabilities(evaluated):
    from xray.model.network import predict_paths

    result, dataset, spec = evaluated
    rows = inputs.select(dataset.manifest, "test", spec)
    again = predict_paths(result.calibrated, dataset.paths(rows), spec)
    np.testing.assert_allclose(again, result.p_test, atol=1e-5)
