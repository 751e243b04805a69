"""A service's pid file: the process it names, while that process runs. Shared by the team stack's services and the
local PACS."""

from __future__ import annotations

import os
from pathlib import Path

from xray.environment import process_running


def live_pid(path: Path) -> int | None:
    """The pid in ``path`` while its process runs; None when there is no file, the process is gone, or it has exited
    and waits for its parent to reap it (a zombie: signal 0 still reaches it). An exited child of this process is
    reaped here, so that a caller polling for a stop sees it at once instead of at its deadline."""
    if not path.is_file():
        return None
    pid = int(path.read_text().split()[0])
    if process_running(pid):
        return pid
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # gone, or another process's child: its parent reaps it
        pass
    return None
