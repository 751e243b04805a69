"""model_card.md for each registered version, written from the run's own numbers."""

from __future__ import annotations

import hashlib
import json
import re

from xray import CLASS_NAMES
from xray.config.scope import ScopeConfig
from xray.monitoring.scope import describe

SITE_TAG = "site."
SITE_SECTION = "## Results by site"
HISTORY_SECTION = "## History"
INTEGRITY_SECTION = "## Files"


def with_history(card: str, line: str) -> str:
    """The card with ``line`` appended to its History section (made before the site results when missing), so that
    rewriting the site results keeps it."""
    head, separator, tail = card.partition(f"\n{SITE_SECTION}\n")
    if f"\n{HISTORY_SECTION}\n" not in head:
        head = head.rstrip("\n") + f"\n\n{HISTORY_SECTION}\nWho moved this version, when and why.\n"
    head = head.rstrip("\n") + f"\n- {line}\n"
    return head + (f"\n{separator}{tail}" if separator else "")


def with_int8(card: str, line: str) -> str:
    """The card with its Model section's int8 line (``line``: xray.serving.runtimes.int8.Int8Outcome.card_line)
    in place of the one it had, or after its training line where it had none (versions registered before int8)."""
    kept = [text for text in card.split("\n") if not text.startswith("- int8")]
    at = next((i for i, text in enumerate(kept) if text.startswith("- Training: ")), None)
    if at is None:  # no Model section to hold it: the line goes before the first section after the title
        at = next((i for i, text in enumerate(kept) if text.startswith("## ")), len(kept)) - 1
    return "\n".join([*kept[: at + 1], line, *kept[at + 1 :]])


def with_integrity(card: str, digest: str) -> str:
    """The card with its "Files" section saying the version's digest (replaced when there is one already), before
    the History and site sections."""
    section = (
        f"{INTEGRITY_SECTION}\nSHA-256 of the version's file list (`files.sha256` beside the model, tag "
        f"`model_sha256`): `{digest}`. Batch inference, serving and monitoring refuse the version when a file "
        "differs from it.\n"
    )
    card = re.sub(rf"(?ms)^{INTEGRITY_SECTION}\n.*?(?=^## |\Z)", "", card).rstrip("\n") + "\n"
    for later in (HISTORY_SECTION, SITE_SECTION):
        head, separator, tail = card.partition(f"\n{later}\n")
        if separator:
            return f"{head.rstrip()}\n\n{section}\n{later}\n{tail}"
    return f"{card.rstrip()}\n\n{section}"


def _ci(report: dict, key: str) -> str:
    low, high = report["ci95"][key]
    return f"{low:.4f} to {high:.4f}"


def _ratio(data_report: dict, split: str) -> str:
    counts = data_report["counts"][split]
    return f"{counts[CLASS_NAMES[1]] / max(counts[CLASS_NAMES[0]], 1):.2f}"


def _val_overlap(data_report: dict) -> str:
    """Only what this run's split was checked to be."""
    overlap = data_report.get("patients_in_train_and_val")
    if overlap is None:
        return "Patients shared by train and val: not counted for this run."
    if overlap == 0:
        return "No patient is in both train and val (counted on this run's splits)."
    return f"{overlap} patients are in both train and val (counted on this run's splits)."


def _val_vs_test(flat: dict, test: dict) -> str:
    """Whether val overstated test in this run: val AUC against test's 95% CI."""
    low, high = test["ci95"]["auc"]
    if flat["val_auc"] > high:
        return (
            f"in this run val overstated test performance (val AUC {flat['val_auc']:.4f}, above test's 95% CI "
            f"{low:.4f}-{high:.4f}), so a threshold or calibration chosen on val transfers imperfectly."
        )
    return (
        f"in this run val AUC {flat['val_auc']:.4f} lies within or below test's 95% CI {low:.4f}-{high:.4f}; "
        "a threshold chosen on val may still transfer imperfectly."
    )


def _calibration(metrics: dict) -> str:
    flat, calibration = metrics["flat"], metrics.get("calibration", {"method": "none"})
    if calibration["method"] == "none":
        return "The model's raw sigmoid output; not calibrated (evaluate.calibration: none)."
    return (
        f"A calibrated P(PNEUMONIA): {calibration['method']} scaling fitted on val after training "
        f"(temperature {calibration['temperature']:.3f}, bias {calibration['bias']:+.3f}) and saved inside the model, "
        f"so every path (batch inference, serving, Grad-CAM, evaluation) returns the same calibrated value. On test: "
        f"ECE {flat['test_ece_uncalibrated']:.4f} before, {flat['test_ece']:.4f} after; Brier "
        f"{flat['test_brier_uncalibrated']:.4f} before, {flat['test_brier']:.4f} after. "
        + (
            "Of val-like images given 0.8, about 80% have pneumonia; the test split's images are not val-like: "
            "calibration fitted on val made test ECE worse, so read these probabilities as calibrated for the "
            "training site only and re-fit them on a share of each new site's labelled images "
            "(`--pipeline evaluation --recalibrate-fraction`)."
            if flat["test_ece"] > flat["test_ece_uncalibrated"]
            else "Of images given 0.8, about 80% have pneumonia, on images like the training site's; re-check at each "
            "new site (`--pipeline evaluation`)."
        )
    )


def _counts(counts: dict) -> str:
    return ", ".join(
        f"{split} {sum(by_class.values())} ({by_class.get(CLASS_NAMES[0], 0)} / {by_class.get(CLASS_NAMES[1], 0)})"
        for split, by_class in counts.items()
    )


def sources_section(data_report: dict, metrics: dict) -> str:
    """The card's "Training sources" (one row per data.sources entry: URI, digest, splits) and "Results per site"
    (each site's test split at this version's operating point and at the site's own, with CIs)."""
    sites = data_report.get("sites") or {}
    if not sites:
        return ""
    lines = [
        "## Training sources",
        "Images per split as total (NORMAL / PNEUMONIA). A site without its own test split has each patient in "
        "train, val or test by a keyed hash (data.split), so a patient keeps its split as the site's data grows.",
        "",
        "| site | source | content digest | splits from | images |",
        "| --- | --- | --- | --- | --- |",
    ]
    for site, entry in sites.items():
        source = entry.get("uri", "") + (f" + labels {entry['labels']}" if entry.get("labels") else "")
        lines.append(
            f"| {site} | `{source}` | `{entry.get('digest', '')[:16]}` | {entry.get('splits_from', '')} | "
            f"{_counts(entry.get('counts', {}))} |"
        )
    per_site = metrics.get("sites") or {}
    if per_site:
        lines += [
            "",
            "## Results per site (test split)",
            "At this version's threshold and calibration, and at the site's own operating point (calibration and "
            "threshold fitted on the site's val; batch inference `--site NAME`, serving `params.site`) where its val "
            "has enough images.",
            "",
            "| site | test images | AUC (95% CI) | sensitivity (95% CI) | specificity (95% CI) | ECE | own threshold | "
            "own sensitivity | own specificity | own ECE |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for site, entry in per_site.items():
            m, own = entry.get("test"), entry.get("test_at_operating_point")

            def ci(values, key):
                return f"{values[key]:.3f} ({values[f'{key}_ci_low']:.3f}-{values[f'{key}_ci_high']:.3f})"

            measured = (
                f"{m['images']} | {ci(m, 'auc')} | {ci(m, 'sensitivity')} | {ci(m, 'specificity')} | {m['ece']:.3f}"
                if m
                else f"{sum(entry['counts']['test'].values())} | not measured | | |"
            )
            mine = (
                f"{own['threshold']:.4f} | {ci(own, 'sensitivity')} | {ci(own, 'specificity')} | {own['ece']:.3f}"
                if own
                else "none | | |"
            )
            lines.append(f"| {site} | {measured} | {mine} |")
        notes = [f"- {site}: {note}" for site, entry in per_site.items() for note in entry.get("notes", [])]
        lines += ([""] + notes) if notes else []
    subgroups = metrics.get("subgroups") or {}
    if subgroups:
        lines += [
            "",
            "## Results by subgroup (test split, from DICOM headers)",
            "At this version's threshold; a value with images of one class only has no metrics.",
            "",
            "| subgroup | value | images (NORMAL / PNEUMONIA) | AUC (95% CI) | sensitivity (95% CI) | "
            "specificity (95% CI) | ECE |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, values in subgroups.items():
            for value, m in values.items():
                counts = f"{sum(m['counts'].values())} ({m['counts'][CLASS_NAMES[0]]} / {m['counts'][CLASS_NAMES[1]]})"
                if "auc" not in m:
                    lines.append(f"| {name} | {value} | {counts} | | | | |")
                    continue
                cells = [
                    f"{m[k]:.3f} ({m[f'{k}_ci_low']:.3f}-{m[f'{k}_ci_high']:.3f})"
                    for k in ("auc", "sensitivity", "specificity")
                ]
                lines.append(f"| {name} | {value} | {counts} | {' | '.join(cells)} | {m['ece']:.3f} |")
    return "\n".join(lines) + "\n"


def render(
    model_name: str,
    metrics: dict,
    counts: dict,
    data_report: dict,
    model_info: dict,
    profile,
    gate: str = "",
    scope: ScopeConfig | None = None,
) -> str:
    """Markdown. ``metrics`` is the evaluate step's report ({"flat", "val", "test", "threshold_policy",
    "calibration"}); ``profile`` the version's :class:`xray.ood.ReferenceProfile`; ``gate`` the promotion gate's
    section (markdown)."""
    flat, test = metrics["flat"], metrics["test"]
    gate_section = f"\n## Promotion gate\n{gate}\n" if gate else ""
    at = test["at_threshold"]
    rows = [
        ("AUC-ROC", f"{flat['test_auc']:.4f}", _ci(test, "auc"), ""),
        (
            "Sensitivity (PNEUMONIA recall)",
            f"{flat['test_sensitivity']:.4f}",
            _ci(test, "sensitivity"),
            f"{flat['test_sensitivity_at_0_5']:.4f}",
        ),
        (
            "Specificity (NORMAL recall)",
            f"{flat['test_specificity']:.4f}",
            _ci(test, "specificity"),
            f"{flat['test_specificity_at_0_5']:.4f}",
        ),
        ("Accuracy", f"{flat['test_accuracy']:.4f}", "", f"{flat['test_accuracy_at_0_5']:.4f}"),
        ("Average precision", f"{flat['test_average_precision']:.4f}", "", ""),
        ("Brier score", f"{flat['test_brier']:.4f}", "", ""),
        ("ECE (15 equal-width bins)", f"{flat['test_ece']:.4f}", _ci(test, "ece"), ""),
    ]
    table = "\n".join(f"| {name} | {value} | {ci} | {other} |" for name, value, ci, other in rows)
    split_rows = "\n".join(
        f"| {split} | {c.get(CLASS_NAMES[0], 0)} | {c.get(CLASS_NAMES[1], 0)} |" for split, c in counts.items()
    )
    (tn, fp), (fn, tp) = at["confusion_matrix"]
    scope_lines = "\n".join(f"- {line}" for line in describe(scope or ScopeConfig()))
    return f"""# Model card: {model_name}

Generated by the training pipeline from run `{model_info["mlflow_run_id"]}`. Every number below is the run's own logged metric.

## Intended use
- Decision support for clinicians reading **pediatric (age 1-5) frontal (AP/PA) chest X-rays**: a probability of
  pneumonia and a NORMAL/PNEUMONIA label at a threshold chosen for high sensitivity.
- **Not a medical device.** Not cleared or approved by any regulator; not for diagnosis or triage without a clinician.

Out of scope: adults; lateral views; other hospitals, scanners or populations without local validation; CT; any
finding other than pneumonia (the model knows only NORMAL vs PNEUMONIA).

## Model
- Backbone: {model_info["backbone"]} (weights: {model_info["weights"]}), input {model_info["image_size"]}x{model_info["image_size"]} RGB, raw pixel values 0-255.
- Preprocessing (inside serving and batch inference): {model_info["preprocessing"]}.
- Training: {model_info["epochs_run"]} epochs, early stopping on val AUC, class weights {model_info["class_weights"]}.
{model_info.get("int8", "")}

## Training data
Kermany et al. 2018 (Guangzhou Women and Children's Medical Center), CC BY 4.0; archive SHA-256 `{model_info["dataset_sha256"]}`.

| split | NORMAL | PNEUMONIA |
| --- | --- | --- |
{split_rows}

- Validation split: {data_report["val_source"]}. {_val_overlap(data_report)}
- Cross-split duplicate images removed: {len(data_report["duplicates_removed"])}; quarantined images: {len(data_report["quarantined"])}.
- Patients present in both train and test (the dataset's own split): {data_report["patients_in_train_and_test"]}.

{sources_section(data_report, metrics)}
## What the probability means
{_calibration(metrics)}

## Decision threshold
{flat["threshold"]:.4f}, chosen on val only, on calibrated probabilities: {metrics["threshold_policy"]}. The test
split never influenced it.

## Test metrics ({test["n"]} images)
| metric | at threshold {flat["threshold"]:.4f} | 95% bootstrap CI | at 0.5 |
| --- | --- | --- | --- |
{table}

Confusion matrix at the threshold: TN {tn}, FP {fp}, FN {fn}, TP {tp}.
Val: AUC {flat["val_auc"]:.4f}, sensitivity {flat["val_sensitivity"]:.4f}, specificity {flat["val_specificity"]:.4f}.

## Out-of-distribution inputs
Every prediction (batch inference, REST serving) carries an `ood_score` and a `status`: `ok`,
`out_of_distribution` (with the reason) or `unreadable`. **An out-of-distribution image keeps its probability
and score but gets no label** (`label` is empty for every status but `ok`): the model was never validated on such images.
- Checked against this version's reference profile (train split: {len(profile.train_content)} images; thresholds on
  val: {len(profile.val_content)} images): image content (a low-resolution view, compared with the nearest training
  images), acquisition statistics (exposure, contrast, noise, sharpness, grey-level histogram), colour, size and
  aspect ratio. `ood_score` above 1 is out of distribution; {profile.val_ood_fraction:.1%} of val images score
  above 1 (nominal {profile.alpha:.0%}).
- A batch is checked as a whole with `python3 run.py --pipeline monitoring --images ...` (docs/MONITORING.md).

## Validated scope (checked from the DICOM header)
Before the pixels of a DICOM image are trusted, its header is checked against this version's scope (the `scope:`
config section, stored with the version). An image outside it gets `status` `out_of_scope` and a `reason` naming the
tag and its value (e.g. `PatientAge 045Y outside the validated 1-5 years`), keeps its probability, and gets no label.
A tag the header lacks is listed in `scope_unchecked`. JPEG and PNG images carry no header: only the pixel checks
apply to them.
{scope_lines}

## What is read from a DICOM file, and what is kept
Read: the pixels (Modality LUT, the first VOI LUT or window, MONOCHROME1 inverted, onto the 8-bit input) and the
tags above. Kept in predictions, logs and stores: the Study, Series and SOP Instance UIDs, the scope's tags and a
keyed hash of PatientID (key `XRAY_PATIENT_KEY`; used only to group a patient's images). Never kept: the patient's
name, ID, birth date, address, the accession number, institution, physicians, operators, station and descriptions.

## Known limitations
- **Prior and acquisition shift between splits.** Train is 1 NORMAL : {_ratio(data_report, "train")} PNEUMONIA, test 1 : {_ratio(data_report, "test")}, and the test
  images differ in acquisition from train; {_val_vs_test(flat, test)}
- **Single source centre.** All images come from one hospital; expect lower performance elsewhere until validated locally.
- Labels come from the dataset's curation (expert graders), not from a clinical reference standard per case.
- Pneumonia subtypes (bacterial, viral) are merged into one class.
- Calibration holds for images like val (train's prevalence, about 3 PNEUMONIA to 1 NORMAL). At another prevalence or
  site the probabilities shift: measure and re-fit them there (`python3 run.py --pipeline evaluation ... 
  --recalibrate-fraction 0.3`) before reading them as risks.
{gate_section}
{site_table({})}
"""


def proposal_id(point: dict) -> str:
    """The short SHA-256 of a proposed operating point: a reviewer applies exactly the proposal they looked at."""
    return hashlib.sha256(json.dumps(point, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def site_tag(site: str, metrics: dict, run_id: str, recalibrated: dict | None = None) -> tuple[str, str]:
    """One version tag per site, ``site.<name>``: the run, the metrics at the version's operating point and, with a
    recalibration, its fraction, metrics and whether it meets the policy, as compact JSON (6 significant digits)."""

    def compact(values: dict) -> dict:
        return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in values.items()}

    value: dict[str, object] = {"run_id": run_id, "as_registered": compact(metrics)}
    if recalibrated is not None:
        point = recalibrated.get("operating_point")  # what a reviewer applies where the run's account may not
        value["recalibrated"] = (
            compact(recalibrated["metrics"])
            | {"fraction": recalibrated["fraction"], "meets_policy": recalibrated.get("meets_policy")}
            | ({"operating_point": point} if point else {})
        )
    return f"{SITE_TAG}{site}", json.dumps(value, separators=(",", ":"))


def site_results(tags: dict[str, str]) -> dict[str, dict[str, str]]:
    """{site: {metric: value, "recalibrated.<metric>": value}} from a version's tags: one JSON tag per site, or the
    per-metric tags ``site.<site>.<metric>`` of versions evaluated before."""
    results: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        if not key.startswith(SITE_TAG):
            continue
        if value.startswith("{"):
            try:
                parsed = json.loads(value)
                flat = {k: str(v) for k, v in parsed["as_registered"].items()} | {"run_id": parsed["run_id"]}
                flat |= {f"recalibrated.{k}": str(v) for k, v in (parsed.get("recalibrated") or {}).items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                flat = {"unreadable": "yes"}  # a tag anyone who edits the model may write: shown as unreadable
            results.setdefault(key[len(SITE_TAG) :], {}).update(flat)
        else:
            site, _, metric = key[len(SITE_TAG) :].partition(".")
            results.setdefault(site, {})[metric] = value
    return results


def description(card: str, link: str, limit: int = 5000) -> str:
    """The card as the registered version's description (which MLflow's SQL stores hold to 5000 characters): whole when
    it fits, else its sections in the order a reviewer reads them, as many as fit, and a link to the whole card."""
    if len(card) <= limit:
        return card
    sections = re.split(r"(?m)^(?=## )", card)
    order = (
        "# ",
        "## Intended use",
        "## Decision threshold",
        "## Test metrics",
        "## Results by site",
        "## Promotion gate",
        INTEGRITY_SECTION,
    )
    footer = f"\n\nThe whole card: `{link}` (this description holds its main sections)."
    kept, size = [], len(footer)
    for prefix in order:
        for section in sections:
            if section.startswith(prefix) and section not in kept and size + len(section) <= limit:
                kept.append(section)
                size += len(section)
    return "".join(sorted(kept, key=sections.index)).rstrip() + footer


def site_table(tags: dict[str, str]) -> str:
    """The model card's "Results by site" section, from the version's ``site.*`` tags."""
    results = site_results(tags)
    lines = [
        SITE_SECTION,
        "",
        "Measured with `python3 run.py --pipeline evaluation --model-version N --dataset-uri ... "
        '--site NAME`; 95% bootstrap CIs. "as registered": at this version\'s threshold and calibration; '
        '"recalibrated": threshold and calibration re-fitted on a patient-grouped share of the site, measured '
        "on the rest.",
        "",
    ]
    if not results:
        return "\n".join(lines + ["No site has been evaluated yet."])
    lines += [
        "| site | operating point | images | threshold | AUC | sensitivity | specificity | accuracy | ECE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(values: dict, name: str) -> str:
        if name not in values:
            return ""
        return (
            f"{float(values[name]):.3f} ({float(values[name + '_ci_low']):.3f}-{float(values[name + '_ci_high']):.3f})"
        )

    for site in sorted(results):
        values = results[site]
        try:
            lines += _site_rows(_cell_text(site), values, cell)
        except (ValueError, KeyError, TypeError):
            lines.append(f"| {_cell_text(site)} | (its record is unreadable: not shown) |" + " |" * 7)
    return "\n".join(lines)


def _cell_text(text: str) -> str:
    """A value as one table cell: no line break, no column separator, at most 80 characters."""
    return " ".join(str(text).split()).replace("|", "/")[:80]


def _site_rows(site: str, values: dict, cell) -> list[str]:
    """The table's rows of one site: as registered and, when re-fitted, recalibrated."""
    if "unreadable" in values:
        raise ValueError(site)
    recalibrated = {k.removeprefix("recalibrated."): v for k, v in values.items() if k.startswith("recalibrated.")}
    points = [("as registered", values)]
    if recalibrated:
        points.append((f"recalibrated on {float(recalibrated['fraction']):.0%}", recalibrated))
    return [
        f"| {site} | {label} | {_cell_text(point.get('images', ''))} | {float(point['threshold']):.4f} | "
        + " | ".join(cell(point, m) for m in ("auc", "sensitivity", "specificity", "accuracy", "ece"))
        + " |"
        for label, point in points
    ]
