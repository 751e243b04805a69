"""``node``: the DICOM node, a Storage SCP whose studies are analysed as they arrive (docs/OPERATIONS.md)."""

import click

from cli.common import job_options, run_job

NODE_FLAGS = (
    "host",
    "port",
    "ae_title",
    "allow",
    "spool",
    "stable_seconds",
    "max_spool_gb",
    "destinations",
    "build_workers",
)


@click.command()
@click.option("--host", default=None, help="Address to listen on (node.host; default 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (node.port; default 11112).")
@click.option("--ae-title", default=None, help="The node's AE title (node.ae_title; default XRAY_AI).")
@click.option(
    "--allow", default=None, help="Calling AE titles accepted, comma-separated (node.allow; default MODALITY,ORTHANC)."
)
@click.option("--spool", default=None, help="Spool folder: patient data (node.spool; default .node/spool).")
@click.option(
    "--stable-seconds", type=float, default=None, help="Analyse a study this long after its last instance (10)."
)
@click.option("--max-spool-gb", type=float, default=None, help="Out of resources above this size (node.max_spool_gb).")
@click.option(
    "--destination",
    "destinations",
    multiple=True,
    help="Where results go (repeatable): dicom://AE@HOST:PORT or dicomweb://HOST:PORT/dicom-web (node.destinations).",
)
@click.option(
    "--build-workers",
    type=click.IntRange(0, 64),
    default=None,
    help="Processes that build the reports while the next batch is predicted (node.build_workers; default 2; 0: in "
    "the analysis thread).",
)
@click.option("--heatmaps/--no-heatmaps", default=None, help="Also send the heatmap objects of ok images.")
@click.option("--model-version", default="champion", show_default=True, help="A version number or an alias.")
@click.option(
    "--prediction-log",
    default=None,
    help="A folder, an s3:// prefix or off; default $XRAY_PREDICTION_LOG, else the stack's.",
)
@job_options
def node(model_version, prediction_log, heatmaps, **options):
    """The DICOM node: receive studies by C-STORE, analyse each once stable, send results by C-STORE or STOW-RS."""
    from xray.config.node import NodeConfig
    from xray.requests import NodeRequest

    flags = {name: options.pop(name) for name in NODE_FLAGS}
    flags["heatmaps"] = heatmaps
    if flags["allow"] is not None:
        flags["allow"] = [title for title in flags["allow"].split(",") if title.strip()]
    flags["destinations"] = list(flags["destinations"]) or None

    def build(config):
        changed = {name: value for name, value in flags.items() if value is not None}
        section = NodeConfig.model_validate(config.node.model_dump() | changed)
        return NodeRequest(
            config=config.model_copy(update={"node": section}),
            model_version=model_version,
            prediction_log=prediction_log,
        )

    run_job(options, build, "infra.node:run_node")
