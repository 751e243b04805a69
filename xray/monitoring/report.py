"""The monitoring report of one batch: figures against the reference profile, and the HTML page that holds them."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")  # headless: steps run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from xray.evaluation.plots import image_grid, to_image  # noqa: E402
from xray.monitoring import ood  # noqa: E402
from xray.monitoring.drift import reason_kind  # noqa: E402
from xray.monitoring.performance.estimation import COMPARED  # noqa: E402
from xray.monitoring.performance.feedback import METRICS  # noqa: E402


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
    return to_image(figure)


def probability_shift(batch: np.ndarray, reference: np.ndarray, threshold: float, title: str) -> Image.Image:
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    _histograms(axis, batch, reference, bins=np.linspace(0, 1, 26))
    axis.axvline(threshold, color="red", linestyle="--", label=f"class threshold {threshold:.3f}")
    axis.set(xlabel="predicted P(PNEUMONIA)", ylabel="density", title=title)
    axis.legend(fontsize=8)
    return to_image(figure)


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
    return to_image(figure)


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
    return to_image(figure)


ACQUISITION_PANELS = ("mean", "std", "noise", "edge", "p5", "p95")


def figures(
    profile: ood.ReferenceProfile,
    predictions: pd.DataFrame,
    features: pd.DataFrame,
    examples: dict | None = None,
) -> dict:
    """Plots of one batch against the reference; ``examples``: {path: RGB picture} of the images with the highest
    ood_score (xray.inference.predict_stream keeps them while it streams), shown with their scores."""
    readable = predictions[predictions["status"] != ood.UNREADABLE].reset_index(drop=True)
    flagged = (readable["status"] == ood.OUT_OF_DISTRIBUTION).to_numpy()
    stats = features[list(ood.STAT_NAMES)].to_numpy(dtype=np.float64)
    index = {name: ood.STAT_NAMES.index(name) for name in ACQUISITION_PANELS}
    histogram = slice(ood.STAT_NAMES.index("hist00"), None)
    result = {
        "ood_scores": ood_scores(
            readable["ood_score"].to_numpy(dtype=np.float64),
            profile.val_scores,
            f"Out-of-distribution scores: {flagged.sum()} of {len(readable)} above 1",
        ),
        "probabilities": probability_shift(
            readable["probability"].to_numpy(dtype=np.float64),
            profile.val_probabilities,
            profile.class_threshold,
            "Predicted probabilities: batch against val",
        ),
        "acquisition": acquisition_shift(
            {n: stats[:, i] for n, i in index.items()},
            {n: profile.val_stats[:, i] for n, i in index.items()},
            {n: ood.stat_label(n) for n in ACQUISITION_PANELS},
            (stats[:, histogram].mean(axis=0), profile.val_stats[:, histogram].mean(axis=0)),
        ),
        "content_map": content_map(
            features[ood.content_columns(profile)].to_numpy(dtype=np.float64),
            profile.val_content,
            flagged,
            profile.train_content,
        ),
    }
    if examples:
        rows = readable.set_index("path")
        titles = []
        for path in examples:
            row = rows.loc[path]
            row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
            kind = reason_kind(row["reason"]) if row["status"] == ood.OUT_OF_DISTRIBUTION else "ok"
            titles.append(f"{row['ood_score']:.2f} {kind}\n{str(path).rsplit('/', 1)[-1][:28]}")
        result["most_out_of_distribution"] = image_grid(
            list(examples.values()), titles, title="Highest ood_score in the batch"
        )
    return result


RULE = (
    "The verdict is decided by one test: the share of images out of distribution, an exact one-sided binomial test "
    "against the share of val images flagged at the same threshold, at monitoring.drift_alpha. The content embedding "
    "(MMD), the predicted-positive rate and the acquisition statistics (Kolmogorov-Smirnov, Benjamini-Hochberg "
    "adjusted) are reported beside it and do not decide: the training site's own later images already differ from "
    "val on them (docs/MONITORING.md), and prevalence moves between batches without the model becoming untrustworthy."
)


def reported_shifts(report: dict) -> list[str]:
    """The reported (non-deciding) tests that are significant at the report's alpha, in words."""
    alpha, shifts = report["alpha"], []
    if report["embedding"]["p_value"] < alpha:
        shifts.append(f"content embedding (MMD permutation p = {report['embedding']['p_value']:.3g})")
    if report["positive_rate"]["p_value"] < alpha:
        positive = report["positive_rate"]
        shifts.append(
            f"predicted-positive rate ({positive['batch']:.1%} against {positive['reference']:.1%} on val, "
            f"binomial p = {positive['p_value']:.3g})"
        )
    acquisition = [test for test in report["acquisition"]["tests"] if test["p_adjusted"] < alpha]
    if acquisition:
        shifts.append(
            f"{len(acquisition)} acquisition statistic(s), most of all {acquisition[0]['label']} "
            f"(KS {acquisition[0]['ks']:.2f}, adjusted p = {acquisition[0]['p_adjusted']:.3g})"
        )
    return shifts


def headline(report: dict) -> tuple[str, str, str]:
    """(verdict line, colour, what to do): the deciding test and every significant reported one, named."""
    shifts = reported_shifts(report)
    if report["drift_detected"]:
        return (
            f"DRIFT DETECTED: {report['decision']}",
            "#b00020",
            "More images than on val are out of distribution: do not use this batch's probabilities unreviewed. Look at "
            "the most unusual images and their reasons below, check the acquisition (scanner, export settings, "
            "inversion, cropping), then evaluate the version on labelled images of this source "
            "(python3 run.py --pipeline evaluation) before trusting it there.",
        )
    if shifts:
        return (
            "no drift detected by the deciding test, but "
            f"{len(shifts)} reported test(s) significant: " + "; ".join(shifts),
            "#8a5300",
            "Each image's own status still holds (the out-of-distribution share is as on val). A significant "
            "reported test says the batch differs from val in a way the verdict does not count: if it persists over "
            "batches, measure the version on labelled images of this source (python3 run.py --pipeline evaluation).",
        )
    return (
        "no drift detected: " + report["decision"] + "; no reported test significant either",
        "#1b5e20",
        "Nothing to do; keep monitoring each batch.",
    )


def render_html(report: dict, images: dict) -> str:
    """One self-contained HTML page: the verdict and how it is decided, what to do, the tests, every figure inline."""

    def png(image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    verdict, colour, action = headline(report)
    embedding, positive = report["embedding"], report["positive_rate"]
    rows = [
        ("images / readable / unreadable", f"{report['images']} / {report['readable']} / {report['unreadable']}"),
        (
            "out of distribution",
            f"{report['ood_images']} ({report['ood_fraction']:.1%}); reference "
            f"{report['reference_ood_fraction']:.1%}; by reason {report['ood_reasons']}",
        ),
        ("drift test (decides)", report["decision"]),
        (
            "content embedding, MMD (reported)",
            f"MMD^2 {embedding['mmd2']:.4f}, permutation p = {embedding['p_value']:.3g} "
            f"({embedding['images_used']} batch vs {embedding['reference_images']} val images)",
        ),
        (
            "predicted-positive rate (reported)",
            f"{positive['batch']:.1%} against {positive['reference']:.1%} on val "
            f"(threshold {positive['class_threshold']:.3f}), binomial p = {positive['p_value']:.3g}",
        ),
    ]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    tests = "".join(
        f"<tr><td>{html.escape(t['label'])}</td><td>{t['batch_median']:.3g}</td><td>{t['reference_median']:.3g}</td>"
        f"<td>{t['ks']:.3f}</td><td>{t['p_adjusted']:.3g}</td></tr>"
        for t in report["acquisition"]["tests"][:10]
    )
    pictures = "".join(
        f"<h3>{html.escape(name.replace('_', ' '))}</h3><img src='data:image/png;base64,{png(image)}'>"
        for name, image in images.items()
    )
    model = html.escape(f"{report.get('model_uri', '')}")
    context = (
        f"Model {model} (version {html.escape(str(report.get('model_version', '?')))}); images "
        f"{html.escape(str(report.get('source', '')))}; generated {html.escape(str(report.get('generated_at', '')))}"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Monitoring report {model}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}th,td{{text-align:left;padding:4px 10px;
border-bottom:1px solid #ddd}}img{{max-width:100%}}</style></head><body>
<h1>Monitoring report</h1><p>{context}</p>
<h2 style="color:{colour}">{html.escape(verdict)}</h2>
<p><b>What to do:</b> {html.escape(action)}</p>
<p><b>How the verdict is decided:</b> {html.escape(RULE)}</p>
<table>{table}</table>
<p>Out-of-distribution images keep their probability and score, but get no label: the model was never validated on
such images.</p>
<h2>Acquisition statistics, largest shifts (Kolmogorov-Smirnov, Benjamini-Hochberg adjusted)</h2>
<table><tr><th>statistic</th><th>batch median</th><th>reference median</th><th>KS</th><th>p adjusted</th></tr>{tests}
</table>{pictures}</body></html>
"""


# -- feedback (xray.monitoring.performance.feedback) ---------------------------------------------------------------


def feedback_figure(table: pd.DataFrame, metric: str, floor: float | None = None) -> Image.Image:
    """One metric over the periods, a line and a 95% band per site and version; ``floor``: the alert line."""
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for (site, version), rows in table.groupby(["site", "model_version"], sort=True):
        rows = rows.sort_values("period")
        x = np.arange(len(rows))
        axis.plot(x, rows[metric], marker="o", label=f"{site or '(no site)'} v{version}")
        axis.fill_between(x, rows[f"{metric}_low"], rows[f"{metric}_high"], alpha=0.2)
        axis.set_xticks(x, rows["period"], rotation=30, ha="right")
    if floor is not None:
        axis.axhline(floor, color="red", linestyle="--", linewidth=1, label=f"alert below {floor:g}")
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} per period (labelled predictions, 95% CI)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return to_image(figure)


def feedback_figures(table: pd.DataFrame, min_sensitivity: float, auc_floor: float | None = None) -> dict:
    """Each metric over time with its band and its alert line (sensitivity, AUC): the MLflow run's and the output's."""
    if table.empty:
        return {}
    floors = {"sensitivity": min_sensitivity, "auc": auc_floor}
    return {f"feedback_{m}": feedback_figure(table, m, floors.get(m)) for m in METRICS}


def estimated_figure(table: pd.DataFrame, metric: str, floor: float | None = None) -> Image.Image:
    """One metric over the periods, per site and version: the estimate (dashed, its 95% band shaded; an unreliable
    estimate a hollow grey marker) and, once labels exist, the realised value with its 95% interval (error bars).
    ``table``: :func:`xray.monitoring.performance.comparison.side_by_side`, or an estimate alone."""
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for (site, version), rows in table.groupby(["site", "model_version"], sort=True):
        rows = rows.sort_values("period")
        x = np.arange(len(rows))
        name = f"{site or '(no site)'} v{version}"
        estimate = rows[f"estimated_{metric}"].to_numpy(dtype=np.float64)
        line = axis.plot(x, estimate, linestyle="--", label=f"{name} estimated")[0]
        band = rows[[f"estimated_{metric}_low", f"estimated_{metric}_high"]].to_numpy(dtype=np.float64)
        axis.fill_between(x, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.15)
        reliable = (rows["verdict"] == "reliable").to_numpy()
        axis.plot(x[reliable], estimate[reliable], "o", color=line.get_color())
        axis.plot(x[~reliable], estimate[~reliable], "o", mfc="none", color="grey")
        if metric in rows.columns and rows[metric].notna().any():
            realised = rows[metric].to_numpy(dtype=np.float64)
            error = np.abs(rows[[f"{metric}_low", f"{metric}_high"]].to_numpy(dtype=np.float64).T - realised)
            axis.errorbar(
                x + 0.08, realised, yerr=error, fmt="s", color=line.get_color(), capsize=3, label=f"{name} realised"
            )
        axis.set_xticks(x, rows["period"], rotation=30, ha="right")
    if floor is not None:
        axis.axhline(floor, color="red", linestyle="--", linewidth=1, label=f"alert below {floor:g}")
    axis.plot([], [], "o", mfc="none", color="grey", label="estimate unreliable (never alerts)")
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} per period: estimated (95% band) and realised (95% CI)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return to_image(figure)


def estimated_figures(table: pd.DataFrame, min_sensitivity: float, auc_floor: float | None = None) -> dict:
    """``estimated_<metric>`` for sensitivity, specificity and AUC, with their alert lines (sensitivity, AUC)."""
    if table.empty:
        return {}
    floors = {"sensitivity": min_sensitivity, "auc": auc_floor}
    return {f"estimated_{m}": estimated_figure(table, m, floors.get(m)) for m in COMPARED}
