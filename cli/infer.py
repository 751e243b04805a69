"""``infer`` and ``monitor``: a registered version on a batch of images."""

import click

from cli.common import DRIFT_EXIT_CODE, job_options, run_job
from cli.output import fail

IMAGES_HELP = (
    "A folder, a zip, an s3:// prefix of DICOM/JPEG/PNG images, or a PACS: dicomweb://HOST:PORT/dicom-web[?QIDO "
    "filters, e.g. ModalitiesInStudy=DX&StudyDate=20261101-] (credentials from XRAY_PACS_USER / XRAY_PACS_PASSWORD)."
)
VERSION_HELP = "A registered version number or an alias of the model."
INFERENCE_FIELDS = (
    "images",
    "model_version",
    "output",
    "resume",
    "explain",
    "write_back",
    "heatmaps",
    "site",
    "shards",
)
"""infer's own options: the fields of its request (xray.requests.InferenceRequest), handed over as they are."""


@click.command()
@click.option("--images", required=True, help=IMAGES_HELP)
@click.option("--model-version", default="champion", show_default=True, help=VERSION_HELP)
@click.option(
    "--output",
    default="outputs/predictions.csv",
    show_default=True,
    help="The predictions file, .csv or .parquet, a path or s3:// (written as the images stream; Grad-CAM PNGs go "
    "beside a local one, else under outputs/).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Keep the rows already in --output and predict only images whose content (SHA-256) is not there yet.",
)
@click.option(
    "--explain",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Grad-CAM of the N images most worth a look (the most confident PNEUMONIA calls and those nearest the "
    "threshold), captioned, with a colour bar, beside the predictions.",
)
@click.option(
    "--write-back",
    is_flag=True,
    help="From a dicomweb:// PACS: store one DICOM report per analysed image in its study (a new series per model "
    "version); reports already there are not written again.",
)
@click.option(
    "--heatmaps",
    is_flag=True,
    help="With --write-back: also each ok image's Grad-CAM into its study, as a DICOM Segmentation and a Secondary "
    "Capture with the probability and 'NOT A DIAGNOSIS' burned in (the image is read again from the PACS).",
)
@click.option(
    "--site",
    default=None,
    help="Answer at that site's own operating point (calibration and threshold stored with the version).",
)
@click.option(
    "--shards",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="N predict steps, each on its share of the images (a hash of each name), each writing its own part beside "
    "--output (preds.part-I-of-N.csv, kept for --resume), merged into --output at the end; on the SageMaker "
    "orchestrator each is its own job.",
)
@job_options
def infer(**options):
    """Predictions of a registered version (the champion by default) for a batch of images."""
    from xray.requests import InferenceRequest

    fields = {name: options.pop(name) for name in INFERENCE_FIELDS}

    def build(config):
        return InferenceRequest(config=config, **fields)

    run_job(options, build, "pipelines.inference:run_inference")


@click.command()
@click.option("--images", default=None, help=IMAGES_HELP + " Required unless --from-log.")
@click.option("--model-version", default=None, help=VERSION_HELP + " [default: champion]")
@click.option(
    "--output",
    default="outputs/monitoring",
    show_default=True,
    help="A folder for report.html, report.json, plots and predictions.csv (--from-log: estimates.csv, report.json "
    "and the estimated_*.png plots).",
)
@click.option(
    "--fail-on-drift",
    is_flag=True,
    help=f"Exit with code {DRIFT_EXIT_CODE} when drift is detected (after the summary).",
)
@click.option(
    "--from-log",
    is_flag=True,
    help="No batch: estimate sensitivity, specificity, PPV, NPV and AUC from the prediction log's calibrated "
    "probabilities, per period (monitoring.feedback_period), site and version, with 95% bands and a verdict "
    "(reliable or not, and why); no label is read. A reliable estimated drop alerts like feedback, labelled "
    "estimated.",
)
@job_options
def monitor(images, model_version, output, fail_on_drift, from_log, **options):
    """Is a batch still like the training data? Out-of-distribution checks and a drift report; or, --from-log, this
    period's performance estimated before the labels come."""
    from xray.requests import MonitoringRequest

    def build(config):
        return MonitoringRequest(
            config=config,
            images=images,
            model_version=model_version,
            output=output,
            fail_on_drift=fail_on_drift,
            from_log=from_log,
        )

    def exit_code(summary: dict) -> int:
        if not (fail_on_drift and summary.get("drift_detected")):
            return 0
        fail(
            f"drift detected: {summary['ood_images']} of {summary['readable']} images out of distribution "
            f"(p = {summary['p_value']:.3g}); report {summary['report']}",
            DRIFT_EXIT_CODE,
        )

    run_job(options, build, "pipelines.monitoring:run_monitoring", exit_code)
