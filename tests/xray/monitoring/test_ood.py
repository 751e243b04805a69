"""Per-image out-of-distribution detection: features, the reference profile, its thresholds and rules."""

import io

import numpy as np
import pytest
from PIL import Image
from scipy.stats import norm

from support import radiograph_like
from xray.monitoring import drift, ood


def test_features_of_a_grey_and_a_colour_image():
    grey = radiograph_like(np.random.default_rng(1))
    features = ood.features_of_array(grey)
    assert features.colour == 0.0 and (features.width, features.height) == (96, 96)
    assert features.stats.shape == (len(ood.STAT_NAMES),) and features.pixels.shape == (ood.PIXEL_SIZE**2,)
    assert features.stats[ood.STAT_NAMES.index("mean")] == pytest.approx(grey[..., 0].mean(), abs=1.0)
    assert features.pixels.mean() == pytest.approx(0, abs=1e-4) and features.pixels.std() == pytest.approx(1, abs=1e-3)
    tinted = grey.astype(int)
    tinted[..., 0] += 40
    # +40 on one channel: its deviation from the grey mean is 26.7, the others 13.3 each -> 17.8 on average
    assert ood.features_of_array(np.clip(tinted, 0, 255)).colour == pytest.approx(17.8, abs=0.5)


def test_a_flat_image_has_no_content_and_no_division_by_zero():
    features = ood.features_of_array(np.full((50, 80, 3), 7, np.uint8))
    assert np.all(features.pixels == 0) and features.aspect_ratio == pytest.approx(1.6)
    assert features.stats[ood.STAT_NAMES.index("std")] == 0


def test_features_do_not_depend_on_the_container():
    """A grey PNG, a grey JPEG-free RGB array and an 'L' image give the same numbers."""
    grey = radiograph_like(np.random.default_rng(2))
    buffer = io.BytesIO()
    Image.fromarray(grey[..., 0], "L").save(buffer, format="PNG")
    from_bytes, from_array = ood.features_of_bytes(buffer.getvalue()), ood.features_of_array(grey)
    np.testing.assert_allclose(from_bytes.stats, from_array.stats)
    np.testing.assert_allclose(from_bytes.pixels, from_array.pixels)
    assert from_bytes.channels == 1 and from_array.channels == 3


def test_threshold_is_the_quantile_of_the_combined_statistic():
    # Perfectly correlated detectors: the statistic is a single standard normal.
    assert ood.combined_threshold(1.0, 0.01) == pytest.approx(norm.ppf(0.99), abs=0.01)
    # Independent ones: fresh draws exceed the threshold at the nominal rate.
    threshold = ood.combined_threshold(0.0, 0.01)
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 400_000))
    assert (ood.combined_statistic(a, b, 0.0) > threshold).mean() == pytest.approx(0.01, abs=0.001)
    assert ood.combined_threshold(0.0, 0.05) < threshold < ood.combined_threshold(0.0, 0.001)


def test_profile_is_calibrated_on_val(profile, family):
    pixels, stats = ood.stack([ood.features_of_array(image) for image in family[160:220]])
    content, acquisition = profile.z_scores(pixels, stats)
    assert content.mean() == pytest.approx(0, abs=1e-9) and content.std() == pytest.approx(1, abs=1e-9)
    assert acquisition.mean() == pytest.approx(0, abs=1e-9)
    assert profile.threshold == pytest.approx(ood.combined_threshold(profile.correlation, 0.01))
    assert profile.val_ood_fraction == pytest.approx((profile.val_scores > 1).mean())
    assert profile.val_positive_rate == pytest.approx(0.5, abs=0.02)


def test_fresh_in_distribution_images_are_mostly_ok(profile, family):
    assessment = profile.assess([ood.features_of_array(image) for image in family[220:]])
    assert (assessment["status"] == ood.OK).mean() >= 0.9
    assert (assessment.loc[assessment["status"] == ood.OK, "reason"] == "").all()


@pytest.mark.parametrize("shift", sorted(drift.SHIFTS))
def test_each_synthetic_shift_is_flagged(profile, family, shift):
    shifted = [ood.features_of_array(drift.apply_shift(shift, image, i)) for i, image in enumerate(family[220:240])]
    assessment = profile.assess(shifted)
    assert (assessment["status"] == ood.OUT_OF_DISTRIBUTION).mean() >= 0.8, assessment
    assert assessment["ood_score"].min() > 0


def test_rules_name_their_reason(profile, family):
    grey = family[230]
    colour = grey.copy()
    colour[..., 2] = 255 - colour[..., 2]
    wide = np.concatenate([grey, grey, grey], axis=1)
    tiny = grey[:20, :20]
    reasons = profile.assess([ood.features_of_array(x) for x in (colour, wide, tiny)])["reason"].tolist()
    assert (
        reasons[0].startswith("colour image") and "aspect ratio 3.00" in reasons[1] and "image size 20x20" in reasons[2]
    )


def test_content_and_acquisition_reasons(profile, family):
    rotated = drift.apply_shift("rotate90", family[221], 0)
    noisy = drift.apply_shift("gaussian_noise", family[222], 0)
    rows = profile.assess([ood.features_of_array(rotated), ood.features_of_array(noisy)])
    assert rows["reason"][0].startswith("image content unlike the training images")
    assert rows["reason"][1].startswith("acquisition unlike the training images")


def test_save_and_load_give_the_same_scores(profile, family, tmp_path):
    profile.save(tmp_path / "profile")
    again = ood.ReferenceProfile.load(tmp_path / "profile")
    features = [ood.features_of_array(image) for image in family[200:260]]
    assert profile.assess(features).equals(again.assess(features))
    assert again.aspect_ratio_range == profile.aspect_ratio_range and again.summary == profile.summary


def test_a_profile_from_other_features_is_refused(profile, tmp_path):
    import json

    folder = profile.save(tmp_path / "other")
    scalars = json.loads((folder / ood.PROFILE_JSON).read_text())
    scalars["format"]["pixel_size"] = 16
    (folder / ood.PROFILE_JSON).write_text(json.dumps(scalars))
    with pytest.raises(ValueError, match="other image features"):
        ood.ReferenceProfile.load(folder)


def test_val_labels_are_kept_with_the_profile_and_a_profile_stored_without_them_still_loads(family, tmp_path):
    """The estimate's label-shift test re-weights val by its labels; a profile stored before they were kept has none."""
    features = [ood.features_of_array(image) for image in family[:60]]
    labels = (np.arange(20) % 2).astype(np.float32)  # as xray.data.inputs.labels_of gives them
    profile = ood.fit_profile(features[:40], features[40:], np.linspace(0, 1, 20), 0.5, val_labels=labels)
    folder = profile.save(tmp_path / "labelled")
    np.testing.assert_array_equal(ood.ReferenceProfile.load(folder).val_labels, labels)
    arrays = dict(np.load(folder / ood.PROFILE_ARRAYS))
    del arrays["val_labels"]
    np.savez_compressed(folder / ood.PROFILE_ARRAYS, **arrays)
    assert ood.ReferenceProfile.load(folder).val_labels.shape == (0,)
    with pytest.raises(ValueError, match="19 val labels for 20 val images"):
        ood.fit_profile(features[:40], features[40:], np.linspace(0, 1, 20), 0.5, val_labels=labels[:19])
    with pytest.raises(ValueError, match="val labels must be 0 .NORMAL. or 1 .PNEUMONIA."):
        ood.fit_profile(features[:40], features[40:], np.linspace(0, 1, 20), 0.5, val_labels=labels + 1)


def test_too_few_images_for_a_profile():
    features = [ood.features_of_array(radiograph_like(np.random.default_rng(i))) for i in range(4)]
    with pytest.raises(ValueError, match="at least 3 train and 3 val"):
        ood.fit_profile(features[:2], features[2:], np.zeros(2), 0.5)


def test_feature_table_carries_what_monitoring_needs(profile, family):
    features = [ood.features_of_array(image) for image in family[:5]]
    table = ood.feature_table(features, profile)
    assert len(table) == 5 and set(ood.STAT_NAMES) <= set(table.columns)
    np.testing.assert_allclose(table[ood.content_columns(profile)].to_numpy(), profile.content(ood.stack(features)[0]))
    assert "content_00" not in ood.feature_table(features, None).columns


def test_shifts_are_deterministic_and_keep_the_format(family):
    image = family[0][:, :80]  # not square: a quarter turn swaps the sides
    for name in drift.SHIFTS:
        first, again = drift.apply_shift(name, image, 3), drift.apply_shift(name, image, 3)
        np.testing.assert_array_equal(first, again)
        assert first.dtype == np.uint8 and first.shape[2] == 3 and not np.array_equal(first, image)
    assert drift.apply_shift("rotate90", image, 0).shape == (80, 96, 3)
    np.testing.assert_array_equal(drift.apply_shift("invert", drift.apply_shift("invert", image, 0), 0), image)
    with pytest.raises(KeyError, match="unknown shift"):
        drift.apply_shift("blur", image, 0)
