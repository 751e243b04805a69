"""Figures people would rather look at than read. Each returns a PIL image."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: steps run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from xray import CLASS_NAMES  # noqa: E402


def _to_image(figure) -> Image.Image:
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
    return _to_image(figure)


def sample_grid(paths: list[str], titles: list[str], columns: int = 4) -> Image.Image:
    rows = max(1, int(np.ceil(len(paths) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows))
    for axis, path, title in zip(np.ravel(axes), paths, titles):
        with Image.open(path) as image:
            axis.imshow(image.convert("L"), cmap="gray")
        axis.set_title(title, fontsize=7)
    for axis in np.ravel(axes):
        axis.axis("off")
    return _to_image(figure)


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
    return _to_image(figure)


def confusion(matrix: list[list[int]], title: str) -> Image.Image:
    figure, axis = plt.subplots(figsize=(3.8, 3.4))
    values = np.asarray(matrix)
    axis.imshow(values, cmap="Blues")
    for (i, j), value in np.ndenumerate(values):
        axis.text(j, i, str(value), ha="center", va="center", color="white" if value > values.max() / 2 else "black")
    axis.set_xticks([0, 1], CLASS_NAMES)
    axis.set_yticks([0, 1], CLASS_NAMES)
    axis.set(xlabel="predicted", ylabel="true", title=title)
    return _to_image(figure)


def calibration(y: np.ndarray, curves: dict[str, np.ndarray], title: str = "Reliability (test)") -> Image.Image:
    """Reliability diagram: observed PNEUMONIA rate against mean predicted probability per equal-width bin, one
    line per named probability set (e.g. before and after calibration), with ECE in the legend and the images per
    bin underneath."""
    from xray.calibration import expected_calibration_error, reliability

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
    return _to_image(figure)


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
    return _to_image(figure)


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
    return _to_image(figure)


# -- monitoring: a batch against a model version's reference profile ------------------------------------------------


def _histograms(axis, batch: np.ndarray, reference: np.ndarray, bins: int = 40, labels=("batch", "reference (val)")):
    values = np.concatenate([batch, reference])
    values = values[np.isfinite(values)]
    edges = np.histogram_bin_edges(values, bins=bins) if len(values) else bins
    axis.hist(reference, bins=edges, density=True, alpha=0.5, color="tab:blue", label=labels[1])
    axis.hist(batch, bins=edges, density=True, alpha=0.5, color="tab:orange", label=labels[0])


def ood_scores(batch: np.ndarray, reference: np.ndarray, title: str) -> Image.Image:
    """Out-of-distribution scores of a batch against val's, with the decision boundary at 1."""
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    clipped = np.minimum(batch, 10.0)
    _histograms(axis, clipped, np.minimum(reference, 10.0))
    axis.axvline(1.0, color="red", linestyle="--", label="out of distribution above 1")
    axis.set(xlabel="ood_score (clipped at 10)", ylabel="density", title=title)
    axis.legend(fontsize=8)
    return _to_image(figure)


def probability_shift(batch: np.ndarray, reference: np.ndarray, threshold: float, title: str) -> Image.Image:
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    _histograms(axis, batch, reference, bins=np.linspace(0, 1, 26))
    axis.axvline(threshold, color="red", linestyle="--", label=f"class threshold {threshold:.3f}")
    axis.set(xlabel="predicted P(PNEUMONIA)", ylabel="density", title=title)
    axis.legend(fontsize=8)
    return _to_image(figure)


def acquisition_shift(
    batch: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    labels: dict[str, str],
    mean_histograms: tuple[np.ndarray, np.ndarray],
) -> Image.Image:
    """One panel per acquisition statistic, plus the mean grey-level histograms."""
    names = list(batch)
    columns = 3
    rows = int(np.ceil((len(names) + 1) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, name in zip(np.ravel(axes), names):
        _histograms(axis, batch[name], reference[name], bins=30)
        axis.set_title(labels[name], fontsize=9)
    axis = np.ravel(axes)[len(names)]
    levels = np.arange(len(mean_histograms[0])) * 256 / len(mean_histograms[0])
    width = 256 / len(levels)
    axis.bar(
        levels, mean_histograms[1], width=width, align="edge", alpha=0.5, color="tab:blue", label="reference (val)"
    )
    axis.bar(levels, mean_histograms[0], width=width, align="edge", alpha=0.5, color="tab:orange", label="batch")
    axis.set_title("mean grey-level histogram", fontsize=9)
    axis.legend(fontsize=7)
    for axis in np.ravel(axes)[len(names) + 1 :]:
        axis.axis("off")
    np.ravel(axes)[0].legend(fontsize=7)
    figure.suptitle("Acquisition statistics: batch against the reference")
    return _to_image(figure)


def content_map(batch: np.ndarray, reference: np.ndarray, flagged: np.ndarray, train: np.ndarray) -> Image.Image:
    """The first two content components: train, val and the batch, out-of-distribution images marked."""
    figure, axis = plt.subplots(figsize=(5.6, 5))
    axis.scatter(train[:, 0], train[:, 1], s=3, color="lightgrey", label="train")
    axis.scatter(reference[:, 0], reference[:, 1], s=6, color="tab:blue", alpha=0.6, label="val")
    axis.scatter(batch[~flagged, 0], batch[~flagged, 1], s=10, color="tab:orange", label="batch, in distribution")
    axis.scatter(
        batch[flagged, 0], batch[flagged, 1], s=22, marker="x", color="red", label="batch, out of distribution"
    )
    axis.set(xlabel="content component 1", ylabel="content component 2", title="Image content (whitened components)")
    axis.legend(fontsize=7)
    return _to_image(figure)
