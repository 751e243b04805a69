"""``evaluate`` and ``feedback``: how a registered version does where the labels are."""

import click

from cli.common import DEGRADATION_EXIT_CODE, job_options, run_job
from cli.output import fail


@click.command()
@click.option(
    "--dataset-uri",
    required=True,
    help="A labelled site: a zip, a folder or an s3:// zip with NORMAL/ and PNEUMONIA/ folders at any depth.",
)
@click.option("--model-version", default="champion", show_default=True, help="A version number or an alias.")
@click.option(
    "--site", default=None, help="The site's name in tags and the model card (default: the archive's or folder's)."
)
@click.option(
    "--recalibrate-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Also re-fit calibration and threshold on this patient-grouped share of the site and measure on the rest.",
)
@job_options
def evaluate(dataset_uri, model_version, site, recalibrate_fraction, **options):
    """A registered version on your labelled NORMAL/ and PNEUMONIA/ images: metrics with CIs, in its card."""
    from xray.requests import EvaluationRequest

    def build(config):
        return EvaluationRequest(
            config=config,
            dataset_uri=dataset_uri,
            model_version=model_version,
            site=site,
            recalibrate_fraction=recalibrate_fraction,
        )

    run_job(options, build, "pipelines.evaluation:run_evaluation")


@click.command()
@click.option(
    "--labels",
    required=True,
    help="A CSV with `label` (NORMAL or PNEUMONIA), `sha256` or `sop_instance_uid`, and optionally `read_at`.",
)
@click.option("--site", default=None, help="Only that site's predictions.")
@click.option(
    "--period",
    type=click.Choice(["day", "week", "month"]),
    default=None,
    help="The period performance is computed per (default monitoring.feedback_period, week).",
)
@click.option(
    "--output",
    default="outputs/feedback",
    show_default=True,
    help="A folder for performance.csv, report.json, plots and the labelled images as training sources.",
)
@click.option(
    "--fail-on-degradation",
    is_flag=True,
    help=f"Exit with code {DEGRADATION_EXIT_CODE} when a period degraded (after the summary).",
)
@job_options
def feedback(labels, site, period, output, fail_on_degradation, **options):
    """Readers' labels joined to the prediction log: performance per week, site and version, and alerts."""
    from xray.requests import FeedbackRequest

    def build(config):
        return FeedbackRequest(
            config=config,
            labels=labels,
            site=site,
            period=period,
            output=output,
            fail_on_degradation=fail_on_degradation,
        )

    def exit_code(summary: dict) -> int:
        if not (fail_on_degradation and summary.get("alerts")):
            return 0
        for alert in summary["alerts"][:-1]:
            click.echo(f"error: {alert}", err=True)
        fail(summary["alerts"][-1], DEGRADATION_EXIT_CODE)

    run_job(options, build, "pipelines.feedback:run_feedback", exit_code)
