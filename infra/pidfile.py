"""A service's pid file: the process it names, while that process runs. Shared by the team stack's services and the
local PACS."""

from __future__ import annotations

import os
from pathlib import Path


def live_pid(path: Path) -> int | None:
    """The pid in ``path`` while its process runs; None when there is no file, the process is gone, or it has exited
    and waits for its parent to reap it (a zombie: signal 0 still reaches it). An exited child of this process is
    reaped here, so that a caller polling for a stop sees it at once instead of at its deadline."""
    if not path.is_file():
        return None
    pid = int(path.read_text().split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: running, and not ours to reap
        return pid
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            return pid
    except (OSError, IndexError):
        return pid
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # another process's child: its parent reaps it
        pass
    return None
