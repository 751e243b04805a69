"""``python3 run.py``: one command per job. ``python3 run.py --help`` lists them; ``python3 run.py <job> --help`` its
options. The forms of earlier releases keep working: ``--pipeline X`` (training, tuning, inference, monitoring,
evaluation, feedback) is the command of that job with the same options, no command at all is ``train``, and
``--list-schedules`` is ``schedules``."""

from __future__ import annotations

from collections.abc import Mapping

import click

from cli.audit import audit
from cli.decide import approve, reject, rollback
from cli.evaluate import evaluate, feedback
from cli.infer import infer, monitor
from cli.node import node
from cli.train import int8, schedules, train, tune

PIPELINES = {
    "training": "train",
    "tuning": "tune",
    "inference": "infer",
    "monitoring": "monitor",
    "evaluation": "evaluate",
    "feedback": "feedback",
}
HELP = ("-h", "--help")


def legacy(args: list[str], commands) -> list[str]:
    """The arguments of an earlier release's command line as this one's: ``--pipeline X`` becomes the command of job
    X, ``--list-schedules`` the ``schedules`` command, and nothing that names a command the ``train`` command."""
    args = list(args)
    if "--list-schedules" in args:
        return ["schedules"]
    for index, arg in enumerate(args):
        if arg == "--pipeline" or arg.startswith("--pipeline="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[index + 1] if index + 1 < len(args) else "")
            del args[index : index + (1 if "=" in arg else 2)]
            if value not in PIPELINES:
                raise click.UsageError(f"--pipeline {value!r} is not one of {', '.join(PIPELINES)}")
            return [PIPELINES[value], *args]
    for index, arg in enumerate(args):  # a command after some of its options (`--config X approve ...`)
        if arg in commands and not (index and takes_value(args[index - 1], commands)):
            sub = args[index + 1 : index + 2]  # a group's subcommand goes with it (`--stack team audit verify`)
            if isinstance(commands[arg], click.Group) and sub and sub[0] in commands[arg].commands:
                return [arg, sub[0], *args[:index], *args[index + 2 :]]
            return [arg, *args[:index], *args[index + 1 :]]
    if not args or not any(arg in HELP for arg in args):
        return ["train", *args]
    return args


def takes_value(arg: str, commands) -> bool:
    """Whether ``arg`` is an option that takes the next argument as its value (in any command)."""
    return any(arg in p.opts and not getattr(p, "is_flag", False) for c in every(commands) for p in c.params)


def every(commands: Mapping[str, click.Command]) -> list[click.Command]:
    """The commands and the subcommands of each group among them (``audit verify``, ...)."""
    found = []
    for command in commands.values():
        found += [command, *getattr(command, "commands", {}).values()]
    return found


def belongs_to(option: str, commands: Mapping[str, click.Command]) -> list[str]:
    """The commands (and a group's subcommands, as ``audit show``) that take ``option``."""
    named: dict[str, click.Command] = dict(commands)
    for name, command in commands.items():
        named |= {f"{name} {sub}": c for sub, c in getattr(command, "commands", {}).items()}
    return sorted(name for name, command in named.items() if any(option in p.opts for p in command.params))


class Jobs(click.Group):
    """The commands, in the order a user meets them; earlier releases' forms mapped (:func:`legacy`); an option
    given to the wrong command says which command takes it."""

    def list_commands(self, ctx) -> list[str]:
        return list(self.commands)

    def parse_args(self, ctx, args):
        if args and args[0] in self.commands:
            return super().parse_args(ctx, args)
        return super().parse_args(ctx, legacy(args, self.commands))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as error:
            owners = belongs_to(error.option_name, self.commands)
            if owners:
                message = f"{error.option_name} belongs to {' and '.join(owners)}, not {ctx.invoked_subcommand}"
                raise click.UsageError(message, error.ctx) from None
            raise


@click.group(cls=Jobs, context_settings={"help_option_names": list(HELP)})
def main():
    """Train, evaluate, register, serve and monitor the chest X-ray pneumonia classifier (ZenML, MLflow).

    Each command prints one JSON summary line on stdout; `python3 run.py COMMAND --help` lists its options.
    """


for command in (
    train,
    tune,
    int8,
    infer,
    monitor,
    evaluate,
    feedback,
    approve,
    reject,
    rollback,
    audit,
    schedules,
    node,
):
    main.add_command(command)
