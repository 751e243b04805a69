"""A service's pid file: the process it names, while that process runs. Shared by the team stack's services and the
local PACS.

A pid file holds the pid and the process's start time (``/proc/PID/stat``'s field 22, clock ticks since boot): pid
files outlive a reboot or a container's restart, after which their pid may be another process's, which must never be
taken for the service, waited on or signalled. A file of one field (written before the start time was kept) is
trusted on its pid alone."""

from __future__ import annotations

from pathlib import Path

from xray.environment import process_running


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot); None when there is no such process. With the pid, it names one
    process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_pid(path: Path, pid: int) -> None:
    path.write_text(f"{pid} {start_time(pid) or '-'}\n")


def read_pid(path: Path) -> tuple[int | None, str | None]:
    """The pid ``path`` names, whether or not it runs, and the start time recorded with it (None for a file of one
    field). The pid is None without a file or with one that names no pid: never 0 or a negative number, which
    ``kill`` reads as a whole group or every process."""
    try:
        fields = path.read_text().split()
    except FileNotFoundError:
        return None, None
    pid = int(fields[0]) if fields and fields[0].isdigit() and int(fields[0]) > 0 else None
    return pid, (fields[1] if len(fields) > 1 and fields[1] != "-" else None)


def recorded_pid(path: Path) -> int | None:
    return read_pid(path)[0]


def ours(pid: int, recorded: str | None) -> bool:
    """Whether ``pid`` is still the process recorded (its start time unchanged, or none was recorded), not another
    process that has taken the pid since."""
    now = start_time(pid)
    return recorded is None or now is None or now == recorded


def live_pid(path: Path) -> int | None:
    """The pid in ``path`` while its process runs; None when there is no file, the process is gone, it has exited and
    waits for its parent to reap it (a zombie: signal 0 still reaches it), or its pid is now another process's."""
    pid, recorded = read_pid(path)
    if pid is None or not ours(pid, recorded) or not process_running(pid):
        return None
    return pid


def group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` runs (its zombies, which a container's init may never reap, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False
