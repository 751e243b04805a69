"""``audit verify``, ``audit show [--json]``, ``audit approve-plan``: the tamper-evident audit trail of every decision
on the model (xray.registry.control.audit), on the stack's artifact store."""

import click

from cli.common import AUDIT_BROKEN_EXIT_CODE, job_options, run_job


def _audit(action: str, options: dict, **fields) -> None:
    from xray.requests import AuditRequest

    def code(summary) -> int:
        return 0 if not isinstance(summary, dict) or summary.get("intact", True) else AUDIT_BROKEN_EXIT_CODE

    build = lambda config: AuditRequest(config=config, action=action, **fields)  # noqa: E731
    run_job(options, build, "pipelines.audit:run_audit", code, tensorflow=False)


@click.group()
def audit():
    """The audit trail: every registration, gate decision, approval, rejection, rollback, change plan version and
    its approval, write-back batch and node start, each record carrying the hash of the one before."""


@audit.command()
@job_options
def verify(**options):
    """Check the chain; exit 5 naming the first record that breaks it (edited, deleted or reordered)."""
    _audit("verify", options)


@audit.command()
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON line: the records, and under files their paths or URIs."
)
@job_options
def show(as_json, **options):
    """List the records, oldest first (one line each)."""
    _audit("show", options, as_json=as_json)


@audit.command(name="approve-plan")
@click.option("--reason", required=True, help="Why the plan is approved (on the record).")
@click.option(
    "--reviewer",
    default=None,
    help="Who approves; on a tracking server with accounts the signed-in reviewer account (MANAGE on the model) is "
    "recorded, and an account without MANAGE refused.",
)
@job_options
def approve_plan(reason, reviewer, **options):
    """The reviewer approves the config's change plan version: a version gated under it may then become champion."""
    _audit("approve-plan", options, reason=reason, reviewer=reviewer)
