"""A service's pid file (infra.pidfile), as the local PACS and the team stack read it: a process that has exited is
not running, even before its parent reaps it, so that a stop polling for it ends when it does."""

import os
import signal
import subprocess
import sys

from infra.pacs import Pacs
from infra.pidfile import live_pid
from infra.team.processes import Processes


def test_a_running_process_is_live_and_an_exited_child_is_not_before_or_after_its_reaping(tmp_path):
    path = tmp_path / "service.pid"
    assert live_pid(path) is None  # no file
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(f"{child.pid}\n")
        assert live_pid(path) == child.pid
        os.kill(child.pid, signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie signal 0 still reaches
        assert live_pid(path) is None
        assert child.poll() is not None  # reaped by live_pid: nothing of it is left
        assert live_pid(path) is None  # gone altogether
    finally:
        child.kill()


def test_the_pacs_and_the_team_stack_read_their_pid_files_through_it(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pacs, processes = Pacs(state=tmp_path, port=1), Processes(state=tmp_path)
        processes.pid_file("zenml").parent.mkdir()
        for path in (tmp_path / "orthanc.pid", processes.pid_file("zenml")):
            path.write_text(f"{child.pid}\n")
        assert pacs.pid() == processes.pid("zenml") == child.pid
        os.kill(child.pid, signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert pacs.pid() is None and processes.pid("zenml") is None
        assert pacs.down() is False  # nothing running: the stop returns at once, without a signal
    finally:
        child.kill()
        child.wait()


def test_another_users_process_is_live(tmp_path):
    path = tmp_path / "init.pid"
    path.write_text("1\n")  # not this process's child, and running: never reaped, always live
    assert live_pid(path) == 1
