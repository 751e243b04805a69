"""Cron validation for scheduled retraining, before anything is submitted.

SageMaker schedules run on Amazon EventBridge Scheduler, whose cron has six
fields: ``cron(minutes hours day-of-month month day-of-week year)``, and one of
day-of-month and day-of-week must be ``?``.
"""

from __future__ import annotations

import hashlib
import re

from xray.errors import ConfigError

MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
FIELDS = (  # name, low, high, names, extra single-token forms
    ("minutes", 0, 59, [], ()),
    ("hours", 0, 23, [], ()),
    ("day-of-month", 1, 31, [], (r"\?", r"L", r"LW", r"L-\d{1,2}", r"\d{1,2}W")),
    ("month", 1, 12, MONTHS, ()),
    ("day-of-week", 1, 7, DAYS, (r"\?", r"L", r"(\d|[A-Z]{3})L", r"(\d|[A-Z]{3})#[1-5]")),
    ("year", 1970, 2199, [], ()),
)


class CronError(ConfigError, ValueError):
    pass


def _value(token: str, low: int, high: int, names: list[str]) -> int:
    if token.upper() in names:
        return names.index(token.upper()) + low
    if not token.isdigit() or not low <= int(token) <= high:
        raise CronError(f"'{token}' is not in {low}-{high}" + (f" or {names[0]}-{names[-1]}" if names else ""))
    return int(token)


def _check_field(text: str, low: int, high: int, names: list[str], extras: tuple[str, ...]) -> None:
    if any(re.fullmatch(pattern, text.upper()) for pattern in extras):
        return
    for part in text.split(","):
        base, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise CronError(f"step '/{step}' must be a positive number")
        if base == "*":
            continue
        first, _, last = base.partition("-")
        start = _value(first, low, high, names)
        if last and _value(last, low, high, names) < start:
            raise CronError(f"range '{base}' runs backwards")


def validate_aws_cron(expression: str) -> str:
    """Return the bare six fields of a valid EventBridge cron, else raise CronError."""
    text = expression.strip()
    match = re.fullmatch(r"cron\((.*)\)", text)
    body = (match.group(1) if match else text).strip()
    parts = body.split()
    if len(parts) != 6:
        raise CronError(
            f"invalid schedule '{expression}': AWS cron needs six fields, "
            f"cron(minutes hours day-of-month month day-of-week year), e.g. cron(0 3 ? * MON *); got {len(parts)}"
        )
    for (name, low, high, names, extras), text_field in zip(FIELDS, parts):
        try:
            _check_field(text_field, low, high, names, extras)
        except CronError as error:
            raise CronError(f"invalid schedule '{expression}': {name} field '{text_field}': {error}") from None
    if (parts[2] == "?") == (parts[4] == "?"):
        raise CronError(f"invalid schedule '{expression}': exactly one of day-of-month and day-of-week must be '?'")
    return body


def schedule_name(expression: str) -> str:
    """The same name for the same cron expression in every process (``hash()`` of a str is salted per process)."""
    return f"chest-xray-training-{hashlib.sha256(expression.strip().encode()).hexdigest()[:10]}"
