"""Batch-level drift: the tests, the decision and the report, on synthetic profiles and batches."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from xray.errors import DataQualityError
from xray.monitoring import drift, ood
from xray.monitoring.report import figures, headline, render_html


def batch_of(profile, arrays, probability=0.3):
    features = [ood.features_of_array(a) for a in arrays]
    predictions = profile.assess(features)
    predictions["probability"] = probability
    predictions["path"] = [f"img{i}.png" for i in range(len(arrays))]
    return predictions, ood.feature_table(features, profile)


def test_ood_share_test():
    assert drift.ood_share_test(0, 100, 0.01) == 1.0
    assert drift.ood_share_test(10, 100, 0.01) < 1e-5
    assert drift.ood_share_test(2, 100, 0.01) > 0.2
    assert drift.ood_share_test(5, 100, 0.02) > drift.ood_share_test(6, 100, 0.02)


def test_mmd_statistic_and_p_values():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((150, 8))
    same, shifted = rng.standard_normal((100, 8)), rng.standard_normal((100, 8)) + 0.6
    mmd, p_same = drift.mmd_test(same, reference, permutations=300, seed=1)
    _, p_shifted = drift.mmd_test(shifted, reference, permutations=300, seed=1)
    assert p_same > 0.05 and p_shifted < 0.01
    # The statistic is the biased MMD^2 with the median-heuristic Gaussian kernel.
    from scipy.spatial.distance import cdist

    pairs = cdist(reference, reference, "sqeuclidean")
    bandwidth = np.median(pairs[np.triu_indices(150, 1)])
    k = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / bandwidth)  # noqa: E731
    expected = k(same, same).mean() + k(reference, reference).mean() - 2 * k(same, reference).mean()
    assert mmd == pytest.approx(expected, rel=1e-9)


def test_an_in_distribution_batch_is_not_drift(profile, family):
    predictions, features = batch_of(profile, family[220:300])
    report = drift.compare(profile, predictions, features, permutations=200)
    assert report["drift_detected"] is False and report["p_value"] >= 0.01
    assert report["images"] == report["readable"] == 80 and report["unreadable"] == 0
    assert report["ood_fraction"] == pytest.approx(report["ood_images"] / 80)
    assert report["positive_rate"]["batch"] == 0.0 and report["positive_rate"]["shifted"] is True


def test_a_batch_with_shifted_images_is_drift(profile, family):
    arrays = [255 - a if i < 15 else a for i, a in enumerate(family[220:300])]
    predictions, features = batch_of(profile, arrays)
    report = drift.compare(profile, predictions, features, permutations=200)
    assert report["drift_detected"] is True and report["p_value"] < 1e-6
    assert report["ood_images"] >= 15 and set(report["ood_reasons"]) <= {"acquisition", "content"}
    assert "binomial p" in report["decision"]


def test_unreadable_images_are_counted_but_not_tested(profile, family):
    predictions, features = batch_of(profile, family[220:240])
    bad = pd.DataFrame(
        {
            "status": [ood.UNREADABLE] * 3,
            "reason": ["empty file (0 bytes)"] * 3,
            "probability": np.nan,
            "ood_score": np.nan,
            "path": ["x.jpeg"] * 3,
        }
    )
    report = drift.compare(profile, pd.concat([predictions, bad], ignore_index=True), features, permutations=100)
    assert (report["images"], report["readable"], report["unreadable"]) == (23, 20, 3)


def test_out_of_scope_images_are_counted_and_their_flagged_pixels_still_count(profile, family):
    arrays = [255 - a if i < 15 else a for i, a in enumerate(family[220:300])]
    predictions, features = batch_of(profile, arrays)
    flagged = int((predictions["status"] == ood.OUT_OF_DISTRIBUTION).sum())
    # The first 20 are adults by their header: the inverted ones among them were flagged by the pixels as well.
    for index in range(20):
        pixels = predictions.at[index, "reason"]
        also = f"; out of distribution: {pixels}" if predictions.at[index, "status"] == ood.OUT_OF_DISTRIBUTION else ""
        predictions.at[index, "reason"] = "PatientAge 045Y outside the validated 1-5 years" + also
        predictions.at[index, "status"] = "out_of_scope"
    report = drift.compare(profile, predictions, features, permutations=100)
    assert report["out_of_scope_images"] == 20 and report["out_of_scope_tags"] == {"PatientAge": 20}
    assert report["ood_images"] == flagged and report["readable"] == 80


def test_a_batch_with_nothing_readable_is_an_error(profile):
    bad = pd.DataFrame(
        {
            "status": [ood.UNREADABLE] * 2,
            "reason": ["not a recognised image format"] * 2,
            "probability": np.nan,
            "ood_score": np.nan,
            "path": ["a.jpeg", "b.jpeg"],
        }
    )
    with pytest.raises(DataQualityError, match="none of the 2 images could be read"):
        drift.compare(profile, bad, ood.feature_table([], profile))


def test_feature_rows_must_match_readable_images(profile, family):
    predictions, features = batch_of(profile, family[220:230])
    with pytest.raises(ValueError, match="feature rows"):
        drift.compare(profile, predictions, features.iloc[:5])


def test_acquisition_tests_rank_the_shifted_statistic_first(profile, family):
    darker = [np.clip(a.astype(int) - 60, 0, 255).astype(np.uint8) for a in family[220:300]]
    _, stats = ood.stack([ood.features_of_array(a) for a in darker])
    tests = drift.acquisition_tests(stats, profile.val_stats)
    assert len(tests) == len(ood.STAT_NAMES)
    assert tests[0]["p_adjusted"] < 0.01 and tests[0]["batch_median"] != tests[0]["reference_median"]


def test_figures_and_html_report(profile, family, tmp_path):
    arrays = [255 - a if i < 3 else a for i, a in enumerate(family[220:250])]
    predictions, features = batch_of(profile, arrays)
    worst = predictions["ood_score"].to_numpy().argsort()[::-1][:4]
    examples = {predictions["path"][i]: Image.fromarray(arrays[i]).convert("RGB") for i in worst}
    report = drift.compare(profile, predictions, features, permutations=100)
    pictures = figures(profile, predictions, features, examples)
    assert set(pictures) == {"ood_scores", "probabilities", "acquisition", "content_map", "most_out_of_distribution"}
    assert all(image.width > 300 for image in pictures.values())
    page = render_html(report | {"model_uri": "models:/m/1", "source": "batch"}, pictures)
    verdict = "DRIFT DETECTED" if report["drift_detected"] else "no drift detected"
    assert verdict in page and page.count("data:image/png;base64,") == 5 and "models:/m/1" in page


def test_the_headline_names_the_deciding_test_every_significant_reported_one_and_what_to_do(profile, family):
    """A verdict of no drift above a significant embedding test must say so, not stand green on its own."""
    predictions, features = batch_of(profile, family[220:260])
    report = drift.compare(profile, predictions, features, permutations=100)
    assert not report["drift_detected"]
    quiet = report | {"embedding": report["embedding"] | {"p_value": 0.5}}
    quiet["positive_rate"] = quiet["positive_rate"] | {"p_value": 0.5}
    quiet["acquisition"] = quiet["acquisition"] | {"tests": []}
    verdict, colour, action = headline(quiet)
    assert verdict.startswith("no drift detected: ") and "binomial p" in verdict and "Nothing to do" in action
    shifted = quiet | {"embedding": quiet["embedding"] | {"p_value": 0.002}}
    verdict, colour, action = headline(shifted)
    assert "1 reported test(s) significant" in verdict and "content embedding (MMD permutation p = 0.002)" in verdict
    assert colour != headline(quiet)[1] and "evaluation" in action
    page = render_html(
        shifted | {"model_uri": "models:/m/4", "model_version": "4", "generated_at": "2026-12-02T10:00:00+00:00"}, {}
    )
    assert "version 4" in page and "2026-12-02T10:00:00+00:00" in page and "How the verdict is decided" in page
    assert "What to do" in page and "content embedding (MMD permutation p = 0.002)" in page
