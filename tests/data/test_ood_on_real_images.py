"""The out-of-distribution detector on real images: the internal test split, adult X-rays from other hospitals,
photographs and synthetic shifts (issue #14's acceptance, on the detector alone: it does not depend on the classifier).

The profile is fitted exactly as the training pipeline's profile_reference step fits it: on the train split of the
full archive validated with seed 42, thresholds on its patient-grouped val.
"""

import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from support import NEAR_OOD_ZIP, require
from xray.monitoring import drift, ood

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def detector(full_dataset):
    dataset, _ = full_dataset
    manifest = dataset.manifest
    paths = {s: dataset.paths(manifest[manifest["split"] == s]) for s in ("train", "val", "test")}
    features = {s: ood.features_of_files(p) for s, p in paths.items()}
    profile = ood.fit_profile(features["train"], features["val"], np.full(len(features["val"]), 0.5), 0.5)
    test_images = [np.asarray(Image.open(p).convert("RGB")) for p in paths["test"]]
    return profile, features["test"], test_images


def flagged(profile, features) -> np.ndarray:
    return (profile.assess(features)["status"] == ood.OUT_OF_DISTRIBUTION).to_numpy()


def drift_p(profile, features) -> float:
    predictions = profile.assess(features)
    predictions["probability"] = 0.5
    return drift.compare(profile, predictions, ood.feature_table(features, profile), permutations=100)["p_value"]


def test_internal_test_split_is_in_distribution(detector):
    profile, test, _ = detector
    assert flagged(profile, test).mean() <= 0.03
    assert drift_p(profile, test) >= 0.01


def test_adult_xrays_from_other_hospitals_are_flagged(detector):
    profile, _, _ = detector
    with zipfile.ZipFile(require(NEAR_OOD_ZIP)) as archive:
        names = [n for n in archive.namelist() if n.lower().endswith(".jpeg")]
        adults = [ood.features_of_bytes(archive.read(n)) for n in names]
    assert len(adults) == 55
    assert flagged(profile, adults).mean() >= 0.80
    assert drift_p(profile, adults) < 0.01


def test_photographs_and_other_non_radiographs_are_flagged(detector):
    import skimage

    profile, _, _ = detector
    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    pictures = []
    for name in sorted(os.listdir(folder)):
        if name.endswith((".png", ".jpg")):
            with Image.open(os.path.join(folder, name)) as image:
                pictures.append(ood.features_of(image))
    faces = np.load(os.path.join(folder, "lfw_subset.npy"))  # 200 faces, 25 x 25 grey
    pictures += [
        ood.features_of_array(np.repeat((face[..., None] * 255).astype(np.uint8), 3, axis=2)) for face in faces
    ]
    assert len(pictures) >= 220
    assert flagged(profile, pictures).mean() >= 0.99


@pytest.mark.parametrize("shift", sorted(drift.SHIFTS))
def test_each_synthetic_shift_is_flagged_and_a_shifted_batch_drifts(detector, shift):
    profile, _, images = detector
    shifted = [ood.features_of_array(drift.apply_shift(shift, image, i)) for i, image in enumerate(images)]
    assert flagged(profile, shifted).mean() >= 0.8
    rng = np.random.default_rng(0)
    batch = [shifted[i] for i in rng.choice(len(shifted), 100, replace=False)]
    assert drift_p(profile, batch) < 0.01


def test_ten_percent_shifted_is_drift_and_the_clean_batch_is_not(detector):
    profile, test, images = detector
    rng = np.random.default_rng(1)
    names = sorted(drift.SHIFTS)
    clean_alarms, missed = 0, []
    for draw in range(20):
        picks = rng.choice(len(test), 100, replace=False)
        batch = [test[i] for i in picks]
        clean_alarms += drift_p(profile, batch) < 0.01
        name = names[draw % len(names)]
        mixed = [ood.features_of_array(drift.apply_shift(name, images[i], draw)) for i in picks[:10]] + batch[10:]
        if drift_p(profile, mixed) >= 0.01:
            missed.append((draw, name))
    assert clean_alarms <= 1, f"{clean_alarms} of 20 clean batches called drift"
    assert missed == [], f"10% shifted batches not detected: {missed}"
