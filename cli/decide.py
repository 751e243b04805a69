"""``approve``, ``reject``, ``rollback``: a person's decisions on a registered version (registry.require_approval)."""

import click

from cli.common import job_options, run_job

REVIEWER_HELP = (
    "Who decides (recorded with the version); on a tracking server with accounts the signed-in "
    "MLFLOW_TRACKING_USERNAME is recorded, and a different name refused."
)


def _decide(action: str, version: str, reviewer, reason, operating_point, options: dict) -> None:
    from xray.requests import DecisionRequest

    def build(config):
        return DecisionRequest(
            config=config,
            action=action,
            model_version=version,
            reviewer=reviewer,
            reason=reason,
            operating_point=operating_point,
        )

    run_job(options, build, "pipelines.decisions:decide", tensorflow=False)


@click.command()
@click.option("--model-version", required=True, help="The version number waiting as the candidate.")
@click.option("--reason", required=True, help="Why (recorded with the version and in its card's History).")
@click.option("--reviewer", default=None, help=REVIEWER_HELP)
@click.option(
    "--operating-point",
    default=None,
    help="SITE:ID: apply the operating point an evaluation proposed for the site, with the ID its summary printed, "
    "instead of approving the version.",
)
@job_options
def approve(model_version, reason, reviewer, operating_point, **options):
    """A candidate that passed the gate becomes champion (its files checked against their digest first)."""
    _decide("approve", model_version, reviewer, reason, operating_point, options)


@click.command()
@click.option("--model-version", required=True, help="The version number waiting as the candidate.")
@click.option("--reason", required=True, help="Why (recorded with the version and in its card's History).")
@click.option("--reviewer", default=None, help=REVIEWER_HELP)
@job_options
def reject(model_version, reason, reviewer, **options):
    """A candidate is turned down: it keeps its registration, never the champion alias."""
    _decide("reject", model_version, reviewer, reason, None, options)


@click.command()
@click.option("--to", "to_version", required=True, help="The version that becomes champion again.")
@click.option("--reason", required=True, help="Why (recorded with both versions).")
@click.option("--reviewer", default=None, help=REVIEWER_HELP)
@job_options
def rollback(to_version, reason, reviewer, **options):
    """The champion alias back to an earlier version that was champion once."""
    _decide("rollback", to_version, reviewer, reason, None, options)
