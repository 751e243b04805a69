"""``train``, ``tune`` and ``schedules``: a model trained, evaluated and registered behind the gate."""

import click

from cli.common import job_options, run_job
from cli.output import configure_logging, emit


@click.command()
@click.option(
    "--dataset-uri",
    default=None,
    help="The dataset archive: s3://bucket/key.zip, a local path or file://; overrides dataset_uri in the config. "
    "Default: $CHEST_XRAY_ZIP, then ../shared/data/chest_xray_224.zip, then Kaggle (kagglehub).",
)
@click.option("--no-cache", is_flag=True, help="Run every step even when ZenML has a cached result.")
@click.option(
    "--schedule",
    "cron",
    default=None,
    help='Attach a schedule instead of running once, e.g. "cron(0 3 ? * MON *)" (AWS six-field syntax on '
    "SageMaker). Needs a stack whose orchestrator can schedule.",
)
@click.option(
    "--if-changed",
    is_flag=True,
    help="Train only if the sources' content (data.sources digests) differs from the champion's training data; "
    'otherwise exit 0 with "skipped" in the summary. For scheduled retraining.',
)
@job_options
def train(dataset_uri, no_cache, cron, if_changed, **options):
    """Train, evaluate and register the classifier (the champion moves only through the promotion gate)."""
    from xray.requests import TrainingRequest

    def build(config):
        return TrainingRequest(
            config=config, dataset_uri=dataset_uri, no_cache=no_cache, schedule=cron, if_changed=if_changed
        )

    run_job(options, build, "pipelines.training:run_training")


@click.command()
@click.option("--dataset-uri", default=None, help="The dataset archive, as for train.")
@click.option("--no-cache", is_flag=True, help="Run every step even when ZenML has a cached result.")
@job_options
def tune(dataset_uri, no_cache, **options):
    """Search the config's `tuning:` space on val, then train and register the winner (configs/tuning_*.yaml)."""
    from xray.requests import TuningRequest

    run_job(
        options,
        lambda config: TuningRequest(config=config, dataset_uri=dataset_uri, no_cache=no_cache),
        "pipelines.tuning:run_tuning",
    )


@click.command("int8")
@click.option("--model-version", default="champion", show_default=True, help="A version number or an alias.")
@click.option("--dataset-uri", default=None, help="The archive the version was trained on, as for train.")
@job_options
def int8(model_version, dataset_uri, **options):
    """Make the int8 model of a version registered without one (as registration does; run with its training config)."""
    from xray.requests import Int8Request

    def build(config):
        return Int8Request(config=config, model_version=model_version, dataset_uri=dataset_uri)

    run_job(options, build, "pipelines.int8:run_int8")


@click.command()
def schedules():
    """List the schedules of the active ZenML project, and how to delete one."""
    configure_logging("warning")
    from pipelines import launch

    for line in launch.schedules():
        emit(line)
