"""Out-of-distribution detection per image: the reference profile of a model version, and how it scores an image.

Two views of every image, both measured on the decoded image and independent of the classifier:

- **acquisition statistics**: width, height, aspect ratio, channels and colour, and on a fixed
  working resolution the grey-level histogram, exposure (mean, percentiles), contrast (standard
  deviation), noise (high-frequency residual) and edge strength;
- **content pixels**: the grey image at ``PIXEL_SIZE`` x ``PIXEL_SIZE``, standardised to zero mean
  and unit variance, so the comparison is about what is where, not how bright it is.

Two detectors score them against the train split (docs/MONITORING.md has the measurements behind
this choice, and why the classifier's own embeddings are not one of them):

- **content**: the log mean distance from the image's content pixels, projected on the train split's
  principal components (whitened), to its ``neighbours`` nearest training images;
- **acquisition**: the log Mahalanobis distance of the acquisition statistics under a Ledoit-Wolf
  covariance of the train split.

Each log score is standardised by its mean and standard deviation on val; the combined statistic is
``max(z_content, z_acquisition, (z_content + z_acquisition) / sqrt(2 + 2 rho))`` (one detector far off,
or both moderately), and the decision threshold is its ``1 - alpha`` quantile under the bivariate
normal fitted on val. Hard rules come first: a colour image, an image much smaller than the training
images, or an aspect ratio far outside theirs is out of distribution whatever its scores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import uniform_filter

from xray.config.monitoring import MonitoringConfig
from xray.data.images import decode_image

WORKING_SIZE = 224
"""Side of the grey image on which intensity, noise and edge statistics are measured."""
PIXEL_SIZE = 32
"""Side of the low-resolution grey view the content detector compares."""
HISTOGRAM_BINS = 16
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
STAT_NAMES = (
    ("mean", "std", "noise", "edge")
    + tuple(f"p{q}" for q in PERCENTILES)
    + tuple(f"hist{i:02d}" for i in range(HISTOGRAM_BINS))
)


@dataclass(frozen=True)
class ImageFeatures:
    width: int
    height: int
    channels: int
    colour: float
    """Mean absolute difference between the RGB channels and their grey value, in 0-255 units; 0 for a grey image."""
    stats: np.ndarray
    """float32, in the order of ``STAT_NAMES``."""
    pixels: np.ndarray
    """float32, ``PIXEL_SIZE**2`` standardised grey values."""

    @property
    def aspect_ratio(self) -> float:
        return self.width / self.height


def features_of(image: Image.Image, size: tuple[int, int] | None = None) -> ImageFeatures:
    """Features of a decoded PIL image (any mode, any size); about 1 ms for a 224 px JPEG. ``size``: the original's
    width and height when ``image`` is its reduced copy (:data:`xray.data.images.REDUCED_SIDE`)."""
    channels = len(image.getbands())
    # Colour on a small copy: a grey image has equal channels everywhere, a photograph does not.
    small_rgb = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BOX), dtype=np.float32)
    colour = float(np.abs(small_rgb - small_rgb.mean(axis=2, keepdims=True)).mean())
    grey = image.convert("L").resize((WORKING_SIZE, WORKING_SIZE), Image.Resampling.BOX)
    levels = np.asarray(grey)
    counts = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    shares = counts / counts.sum()
    values = np.arange(256, dtype=np.float64)
    mean = float(shares @ values)
    std = float(np.sqrt(max(shares @ (values - mean) ** 2, 0.0)))
    cumulative = np.cumsum(shares)
    percentiles = [float(np.searchsorted(cumulative, q / 100.0)) for q in PERCENTILES]
    histogram = shares.reshape(HISTOGRAM_BINS, -1).sum(axis=1)
    pixels32 = levels.astype(np.float32)
    noise = float(np.abs(pixels32 - uniform_filter(pixels32, size=3, mode="nearest")).mean())
    edge = float((np.abs(np.diff(pixels32, axis=0)).mean() + np.abs(np.diff(pixels32, axis=1)).mean()) / 2)
    stats = np.array([mean, std, noise, edge, *percentiles, *histogram], dtype=np.float32)
    small = np.asarray(grey.resize((PIXEL_SIZE, PIXEL_SIZE), Image.Resampling.BOX), dtype=np.float32)
    # A flat image has no structure to standardise: its pixels stay all zero, far from any radiograph.
    pixels = (small - small.mean()) / max(float(small.std()), 1.0)
    return ImageFeatures(*(size or image.size), channels, colour, stats, pixels.reshape(-1))


def features_of_bytes(data: bytes) -> ImageFeatures:
    """Features of encoded bytes, decoded as the model's input is (:func:`xray.data.images.decode_image`: a 16-bit
    image's levels scaled from its bit depth, never clipped)."""
    check, image = decode_image(data)
    if not check.ok:
        raise ValueError(f"cannot compute features: {check.reason}")
    return features_of(image, (check.width, check.height))


def features_of_array(pixels: np.ndarray) -> ImageFeatures:
    return features_of(Image.fromarray(np.asarray(pixels, dtype=np.uint8)))


def features_of_file(path: str) -> ImageFeatures:
    return features_of_bytes(Path(path).read_bytes())


def features_of_files(paths: list[str]) -> list[ImageFeatures]:
    return [features_of_file(path) for path in paths]


def stack(features: list[ImageFeatures]) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, stats) as (N, PIXEL_SIZE**2) and (N, len(STAT_NAMES)) float64 arrays."""
    if not features:
        return np.zeros((0, PIXEL_SIZE**2)), np.zeros((0, len(STAT_NAMES)))
    return (
        np.stack([f.pixels for f in features]).astype(np.float64),
        np.stack([f.stats for f in features]).astype(np.float64),
    )


# ------------------------------------------------------------------------------------------------------------------
# Reference profile

OK, OUT_OF_DISTRIBUTION, UNREADABLE = "ok", "out_of_distribution", "unreadable"
PROFILE_JSON, PROFILE_ARRAYS = "profile.json", "arrays.npz"
STAT_LABELS = {"mean": "exposure (mean grey level)", "std": "contrast", "noise": "noise", "edge": "sharpness"}
SCORE_COLUMNS = ("ood_score", "content_z", "acquisition_z")
"""The detector's scores of an image: the combined statistic over its threshold and the two standardised scores."""
ASSESSMENT_COLUMNS = ["ood_score", "status", "reason", "content_z", "acquisition_z"]


def stat_label(name: str) -> str:
    if name.startswith("p"):
        return f"exposure ({name[1:]}{'st' if name == 'p1' else 'th'} percentile grey level)"
    if name.startswith("hist"):
        low = int(name[4:]) * 256 // HISTOGRAM_BINS
        return f"share of grey levels {low}-{low + 256 // HISTOGRAM_BINS - 1}"
    return STAT_LABELS[name]


@dataclass
class ReferenceProfile:
    """What the train and val splits of one model version looked like, and the thresholds chosen on val.

    Stored with the model version (``data/reference_profile/`` in the MLflow model), so batch inference,
    serving and monitoring all score an image against the same reference.
    """

    # content detector, fitted on train
    pixel_mean: np.ndarray
    components: np.ndarray
    """(k, PIXEL_SIZE**2) principal axes, already divided by the square root of their variance (whitening)."""
    train_content: np.ndarray
    """(n_train, k) the train images in component space: the neighbours the content score measures to."""
    neighbours: int
    # acquisition detector, fitted on train
    stat_mean: np.ndarray
    stat_scale: np.ndarray
    stat_location: np.ndarray
    stat_precision: np.ndarray
    # calibration on val
    content_log_mean: float
    content_log_std: float
    acquisition_log_mean: float
    acquisition_log_std: float
    correlation: float
    threshold: float
    """On the combined statistic; ``ood_score`` is the statistic divided by it, so 1.0 is the decision boundary."""
    alpha: float
    val_ood_fraction: float
    """Share of val images out of distribution at the threshold: the rate a batch from the same source shows."""
    # hard rules, from the train split's acquisition
    colour_limit: float
    min_side: int
    aspect_ratio_range: tuple[float, float]
    # reference distributions for the monitoring report (val, unless named train)
    val_content: np.ndarray
    val_stats: np.ndarray
    val_scores: np.ndarray
    val_probabilities: np.ndarray
    class_threshold: float
    val_positive_rate: float
    summary: dict = field(default_factory=dict)
    """Acquisition of the train split as read: width, height, aspect ratio, channels, colour, histogram."""
    val_labels: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Val's labels (1 = PNEUMONIA), aligned with ``val_scores``: re-weight val to another prevalence (a profile
    stored before they were kept has none)."""

    def __post_init__(self) -> None:
        from sklearn.neighbors import NearestNeighbors  # lazy: scikit-learn only where a profile is used (1 s)

        self._index = NearestNeighbors(n_neighbors=self.neighbours).fit(self.train_content)

    # -- scoring -----------------------------------------------------------------------------------------------
    def content(self, pixels: np.ndarray) -> np.ndarray:
        """(N, k) component-space coordinates of standardised content pixels."""
        return (np.asarray(pixels, dtype=np.float64) - self.pixel_mean) @ self.components.T

    def raw_scores(self, pixels: np.ndarray, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(log content distance, log acquisition distance) per image."""
        if len(pixels) == 0:
            return np.zeros(0), np.zeros(0)
        distances, _ = self._index.kneighbors(self.content(pixels))
        standardised = (np.asarray(stats, dtype=np.float64) - self.stat_mean) / self.stat_scale - self.stat_location
        squared = np.einsum("ij,jk,ik->i", standardised, self.stat_precision, standardised)
        return np.log(np.maximum(distances.mean(axis=1), 1e-12)), np.log(np.maximum(squared, 1e-12))

    def z_scores(self, pixels: np.ndarray, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        content, acquisition = self.raw_scores(pixels, stats)
        return (
            (content - self.content_log_mean) / self.content_log_std,
            (acquisition - self.acquisition_log_mean) / self.acquisition_log_std,
        )

    def statistic(self, content_z: np.ndarray, acquisition_z: np.ndarray) -> np.ndarray:
        return combined_statistic(content_z, acquisition_z, self.correlation)

    def assess(self, features: list[ImageFeatures]) -> pd.DataFrame:
        """One row per image: ood_score, status (ok or out_of_distribution), reason, and the two detectors' z."""
        pixels, stats = stack(features)
        content_z, acquisition_z = self.z_scores(pixels, stats)
        scores = self.statistic(content_z, acquisition_z) / self.threshold
        standardised = (stats - self.stat_mean) / self.stat_scale
        rows = []
        for index, item in enumerate(features):
            reason = self.rule_reason(item)
            if not reason and scores[index] > 1.0:
                if content_z[index] >= acquisition_z[index]:
                    reason = f"image content unlike the training images (content z {content_z[index]:.1f})"
                else:
                    worst = STAT_NAMES[int(np.argmax(np.abs(standardised[index])))]
                    reason = (
                        f"acquisition unlike the training images: {stat_label(worst)} "
                        f"(acquisition z {acquisition_z[index]:.1f})"
                    )
            rows.append(
                {
                    "ood_score": float(scores[index]),
                    "status": OUT_OF_DISTRIBUTION if reason else OK,
                    "reason": reason,
                    "content_z": float(content_z[index]),
                    "acquisition_z": float(acquisition_z[index]),
                }
            )
        return pd.DataFrame(rows, columns=ASSESSMENT_COLUMNS)

    def rule_reason(self, item: ImageFeatures) -> str:
        if item.colour > self.colour_limit:
            return f"colour image (channel difference {item.colour:.1f} > {self.colour_limit:.1f}): not a radiograph"
        if min(item.width, item.height) < self.min_side:
            return f"image size {item.width}x{item.height}: shorter side under {self.min_side} px"
        low, high = self.aspect_ratio_range
        if not low <= item.aspect_ratio <= high:
            return f"aspect ratio {item.aspect_ratio:.2f} (width/height) outside {low:.2f}-{high:.2f}"
        return ""

    # -- storage -----------------------------------------------------------------------------------------------
    ARRAYS = (
        "pixel_mean",
        "components",
        "train_content",
        "stat_mean",
        "stat_scale",
        "stat_location",
        "stat_precision",
        "val_content",
        "val_stats",
        "val_scores",
        "val_probabilities",
        "val_labels",
    )

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / PROFILE_ARRAYS, **{name: getattr(self, name) for name in self.ARRAYS})
        scalars = {k: v for k, v in asdict(self).items() if k not in self.ARRAYS}
        scalars["format"] = {"pixel_size": PIXEL_SIZE, "working_size": WORKING_SIZE, "stat_names": list(STAT_NAMES)}
        (folder / PROFILE_JSON).write_text(json.dumps(scalars, indent=1, default=float))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ReferenceProfile":
        folder = Path(folder)
        scalars = json.loads((folder / PROFILE_JSON).read_text())
        expected = {"pixel_size": PIXEL_SIZE, "working_size": WORKING_SIZE, "stat_names": list(STAT_NAMES)}
        if scalars.pop("format") != expected:
            raise ValueError(f"reference profile in {folder} was made with other image features than this code's")
        scalars["aspect_ratio_range"] = tuple(scalars["aspect_ratio_range"])
        with np.load(folder / PROFILE_ARRAYS) as arrays:
            return cls(**scalars, **{name: arrays[name] for name in cls.ARRAYS if name in arrays.files})


def combined_statistic(content_z: np.ndarray, acquisition_z: np.ndarray, correlation: float) -> np.ndarray:
    """One detector far off, or both moderately: max(z1, z2, (z1 + z2) / sqrt(2 + 2 rho))."""
    both = (content_z + acquisition_z) / np.sqrt(2.0 + 2.0 * correlation)
    return np.maximum(np.maximum(content_z, acquisition_z), both)


def combined_threshold(correlation: float, alpha: float, draws: int = 1_000_000, seed: int = 0) -> float:
    """The 1 - alpha quantile of the combined statistic when (z1, z2) is standard bivariate normal with this correlation.

    A parametric quantile: the empirical 99th percentile of a few hundred val images rests on its five largest
    scores and moves with every val carve (docs/MONITORING.md measures by how much).
    """
    rng = np.random.default_rng(seed)
    first = rng.standard_normal(draws)
    second = correlation * first + np.sqrt(max(1.0 - correlation**2, 0.0)) * rng.standard_normal(draws)
    return float(np.quantile(combined_statistic(first, second, correlation), 1.0 - alpha))


def _summary(features: list[ImageFeatures]) -> dict:
    widths = np.array([f.width for f in features])
    heights = np.array([f.height for f in features])
    aspects = widths / heights
    _, stats = stack(features)

    def quantiles(values: np.ndarray) -> dict:
        return {f"q{q:g}": float(v) for q, v in zip((0, 1, 50, 99, 100), np.percentile(values, (0, 1, 50, 99, 100)))}

    histogram = stats[:, STAT_NAMES.index("hist00") :].mean(axis=0)
    return {
        "images": len(features),
        "width": quantiles(widths),
        "height": quantiles(heights),
        "aspect_ratio": quantiles(aspects),
        "channels": {str(c): int(n) for c, n in zip(*np.unique([f.channels for f in features], return_counts=True))},
        "colour_max": float(max(f.colour for f in features)),
        "exposure_mean": quantiles(stats[:, 0]),
        "contrast_std": quantiles(stats[:, 1]),
        "noise": quantiles(stats[:, 2]),
        "mean_histogram": [float(v) for v in histogram],
    }


def fit_profile(
    train: list[ImageFeatures],
    val: list[ImageFeatures],
    val_probabilities: np.ndarray,
    class_threshold: float,
    settings: MonitoringConfig | None = None,
    seed: int = 0,
    alpha: float | None = None,
    val_labels: np.ndarray | None = None,
) -> ReferenceProfile:
    """Fit both detectors on train; standardise, correlate and threshold their scores on val only. ``settings``: the
    monitoring section (ood_alpha, content_components, neighbours, aspect_ratio_tolerance); ``alpha`` overrides its
    ood_alpha; ``val_labels``: kept with the profile (1 = PNEUMONIA)."""
    settings = settings or MonitoringConfig()
    alpha = settings.ood_alpha if alpha is None else alpha
    components, neighbours = settings.content_components, settings.neighbours
    aspect_ratio_tolerance = settings.aspect_ratio_tolerance
    if len(train) < 3 or len(val) < 3:
        raise ValueError(
            f"a reference profile needs at least 3 train and 3 val images (got {len(train)} and {len(val)})"
        )
    if val_labels is not None and len(val_labels) != len(val):
        raise ValueError(f"{len(val_labels)} val labels for {len(val)} val images")
    if val_labels is not None and not np.isin(np.asarray(val_labels), (0, 1)).all():
        raise ValueError("val labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    from sklearn.covariance import LedoitWolf  # lazy: as in __post_init__
    from sklearn.decomposition import PCA

    train_pixels, train_stats = stack(train)
    val_pixels, val_stats = stack(val)
    pca = PCA(n_components=min(components, len(train) - 1, train_pixels.shape[1]), whiten=True, random_state=seed).fit(
        train_pixels
    )
    whitened_axes = pca.components_ / np.sqrt(np.maximum(pca.explained_variance_, 1e-12))[:, None]
    stat_mean, stat_scale = train_stats.mean(axis=0), np.maximum(train_stats.std(axis=0), 1e-3)
    covariance = LedoitWolf().fit((train_stats - stat_mean) / stat_scale)
    train_content = (train_pixels - pca.mean_) @ whitened_axes.T
    sides = np.minimum([f.width for f in train], [f.height for f in train])
    aspects = np.array([f.aspect_ratio for f in train])
    probabilities = np.asarray(val_probabilities, dtype=np.float64).reshape(-1)
    profile = ReferenceProfile(
        pixel_mean=pca.mean_,
        components=whitened_axes,
        train_content=train_content,
        neighbours=min(neighbours, len(train)),
        stat_mean=stat_mean,
        stat_scale=stat_scale,
        stat_location=covariance.location_,
        stat_precision=covariance.precision_,
        content_log_mean=0.0,
        content_log_std=1.0,
        acquisition_log_mean=0.0,
        acquisition_log_std=1.0,
        correlation=0.0,
        threshold=1.0,
        alpha=alpha,
        val_ood_fraction=0.0,
        colour_limit=max(2.0, 2.0 * max(f.colour for f in train)),
        min_side=int(max(16, 0.5 * np.percentile(sides, 1))),
        aspect_ratio_range=(
            float(np.percentile(aspects, 0.5) / aspect_ratio_tolerance),
            float(np.percentile(aspects, 99.5) * aspect_ratio_tolerance),
        ),
        val_content=(val_pixels - pca.mean_) @ whitened_axes.T,
        val_stats=val_stats,
        val_scores=np.zeros(len(val)),
        val_probabilities=probabilities,
        class_threshold=float(class_threshold),
        val_positive_rate=float((probabilities >= class_threshold).mean()) if len(probabilities) else float("nan"),
        summary=_summary(train),
        val_labels=np.zeros(0) if val_labels is None else np.asarray(val_labels, dtype=np.int8).reshape(-1),
    )
    content, acquisition = profile.raw_scores(val_pixels, val_stats)
    profile.content_log_mean, profile.content_log_std = float(content.mean()), float(max(content.std(), 1e-6))
    profile.acquisition_log_mean = float(acquisition.mean())
    profile.acquisition_log_std = float(max(acquisition.std(), 1e-6))
    content_z, acquisition_z = profile.z_scores(val_pixels, val_stats)
    correlation = float(np.corrcoef(content_z, acquisition_z)[0, 1]) if len(val) > 2 else 0.0
    profile.correlation = correlation if np.isfinite(correlation) else 0.0
    profile.threshold = combined_threshold(profile.correlation, alpha)
    assessment = profile.assess(val)
    profile.val_scores = assessment["ood_score"].to_numpy()
    profile.val_ood_fraction = float((assessment["status"] == OUT_OF_DISTRIBUTION).mean())
    return profile


def content_columns(profile: ReferenceProfile) -> list[str]:
    return [f"content_{i:02d}" for i in range(profile.components.shape[0])]


def feature_table(features: list[ImageFeatures], profile: ReferenceProfile | None) -> pd.DataFrame:
    """What batch monitoring needs of each readable image, without its pixels: size, channels, colour,
    acquisition statistics and (with a profile) the content detector's coordinates."""
    pixels, stats = stack(features)
    table = pd.DataFrame(
        {
            "width": [f.width for f in features],
            "height": [f.height for f in features],
            "channels": [f.channels for f in features],
            "colour": [f.colour for f in features],
        }
    )
    table[list(STAT_NAMES)] = stats if len(features) else np.zeros((0, len(STAT_NAMES)))
    if profile is not None:
        content = profile.content(pixels) if len(features) else np.zeros((0, profile.components.shape[0]))
        table[content_columns(profile)] = content
    return table
