"""Figures people would rather look at than read. Each returns a PIL image."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # headless: steps run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from xray import CLASS_NAMES  # noqa: E402
from xray.evaluation.calibration import expected_calibration_error, reliability  # noqa: E402


@dataclass
class Figures:
    """A step's pictures by name (PNG in the artifact store: materializers/figures.py; the dashboard shows them)."""

    images: dict[str, Image.Image] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Image.Image:
        return self.images[name]


def to_image(figure) -> Image.Image:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def class_distribution(counts: dict[str, dict[str, int]]) -> Image.Image:
    splits = [s for s in counts if sum(counts[s].values())]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for offset, label in zip((-width / 2, width / 2), CLASS_NAMES):
        values = [counts[s][label] for s in splits]
        bars = axis.bar(np.arange(len(splits)) + offset, values, width, label=label)
        axis.bar_label(bars, fontsize=8)
    axis.set_xticks(np.arange(len(splits)), splits)
    axis.set_ylabel("images")
    axis.set_title("Images per split and class (validated manifest)")
    axis.legend()
    return to_image(figure)


def sample_grid(paths: list[str], titles: list[str], columns: int = 4) -> Image.Image:
    rows = max(1, int(np.ceil(len(paths) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows))
    for axis, path, title in zip(np.ravel(axes), paths, titles):
        with Image.open(path) as image:
            axis.imshow(image.convert("L"), cmap="gray")
        axis.set_title(title, fontsize=7)
    for axis in np.ravel(axes):
        axis.axis("off")
    return to_image(figure)


def roc_pr(y: np.ndarray, p: np.ndarray, threshold: float, title: str = "test") -> Image.Image:
    figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(9, 4))
    fpr, tpr, _ = roc_curve(y, p)
    roc_axis.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, p):.3f}")
    roc_axis.plot([0, 1], [0, 1], "--", color="grey")
    predicted = p >= threshold
    sens, spec = predicted[y == 1].mean(), (~predicted[y == 0]).mean()
    roc_axis.scatter([1 - spec], [sens], color="red", zorder=3, label=f"threshold {threshold:.3f}")
    roc_axis.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC ({title})")
    roc_axis.legend(loc="lower right")
    precision, recall, _ = precision_recall_curve(y, p)
    pr_axis.plot(recall, precision, label=f"AP {average_precision_score(y, p):.3f}")
    pr_axis.legend(loc="lower left")
    pr_axis.set(xlabel="recall (PNEUMONIA)", ylabel="precision", title=f"Precision-recall ({title})", ylim=(0, 1.02))
    return to_image(figure)


def confusion(matrix: list[list[int]], title: str) -> Image.Image:
    figure, axis = plt.subplots(figsize=(3.8, 3.4))
    values = np.asarray(matrix)
    axis.imshow(values, cmap="Blues")
    for (i, j), value in np.ndenumerate(values):
        axis.text(j, i, str(value), ha="center", va="center", color="white" if value > values.max() / 2 else "black")
    axis.set_xticks([0, 1], CLASS_NAMES)
    axis.set_yticks([0, 1], CLASS_NAMES)
    axis.set(xlabel="predicted", ylabel="true", title=title)
    return to_image(figure)


def calibration(y: np.ndarray, curves: dict[str, np.ndarray], title: str = "Reliability (test)") -> Image.Image:
    """Reliability diagram: observed PNEUMONIA rate against mean predicted probability per equal-width bin, one
    line per named probability set (e.g. before and after calibration), with ECE in the legend and the images per
    bin underneath."""
    figure, (axis, counts) = plt.subplots(2, 1, figsize=(4.6, 5.4), sharex=True, height_ratios=[3, 1])
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    for name, p in curves.items():
        bins = reliability(y, p)
        axis.plot(
            bins["predicted"],
            bins["observed"],
            marker="o",
            label=f"{name} (ECE {expected_calibration_error(y, p):.3f})",
        )
        counts.hist(p, bins=15, range=(0, 1), histtype="step", label=name)
    axis.set(ylabel="observed fraction PNEUMONIA", title=title, xlim=(0, 1), ylim=(0, 1))
    axis.legend(fontsize=8)
    counts.set(xlabel="predicted P(PNEUMONIA)", ylabel="images")
    figure.tight_layout()
    return to_image(figure)


def training_curves(history: dict[str, list[float]]) -> Image.Image:
    metrics = [m for m in ("loss", "auc", "accuracy") if m in history]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        epochs = np.arange(1, len(history[metric]) + 1)
        axis.plot(epochs, history[metric], marker="o", label="train")
        if f"val_{metric}" in history:
            axis.plot(epochs, history[f"val_{metric}"], marker="o", label="val")
        axis.set(xlabel="epoch", title=metric)
        axis.legend()
    return to_image(figure)


def image_grid(images: list[Image.Image], titles: list[str], columns: int = 4, title: str = "") -> Image.Image:
    rows = max(1, int(np.ceil(len(images) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for axis, image, label in zip(np.ravel(axes), images, titles):
        axis.imshow(image)
        axis.set_title(label, fontsize=8)
    for axis in np.ravel(axes):
        axis.axis("off")
    if title:
        figure.suptitle(title)
    return to_image(figure)
