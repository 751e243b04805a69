"""A service's pid file (infra.pidfile), as the local PACS and the team stack read it: a process that has exited is
not running, even before its parent reaps it, so that a stop polling for it ends when it does; a pid that another
process holds now (a pid file from before a reboot) is never taken for the service nor signalled; a stop ends what is
left of a service's process group when its leader died first. The real services are started in tests/pipelines."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from infra.pacs import Pacs, PacsError
from infra.pidfile import group_running, live_pid, recorded_pid, write_pid
from infra.team.processes import Processes, TeamStackError

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_running_process_is_live_and_an_exited_one_is_not_before_its_reaping(tmp_path):
    path = tmp_path / "service.pid"
    assert live_pid(path) is None  # no file
    child = subprocess.Popen(SLEEP)
    try:
        write_pid(path, child.pid)
        assert live_pid(path) == child.pid and path.read_text().split()[0] == str(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie signal 0 still reaches
        assert live_pid(path) is None
        assert child.wait() == -signal.SIGKILL  # left to its parent: the exit status is still there
        assert live_pid(path) is None  # gone altogether
    finally:
        child.kill()


def test_the_pacs_and_the_team_stack_read_their_pid_files_through_it(tmp_path):
    child = subprocess.Popen(SLEEP)
    try:
        pacs, processes = Pacs(state=tmp_path, port=1), Processes(state=tmp_path)
        processes.pid_file("zenml").parent.mkdir()
        for path in (tmp_path / "orthanc.pid", processes.pid_file("zenml")):
            write_pid(path, child.pid)
        assert pacs.pid() == processes.pid("zenml") == child.pid
        os.kill(child.pid, signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert pacs.pid() is None and processes.pid("zenml") is None
        assert pacs.down() is False  # nothing running: the stop returns at once, without a signal
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("content", ["1\n", "1 -\n"])
def test_a_pid_file_without_a_start_time_is_trusted_on_its_pid(tmp_path, content):
    path = tmp_path / "init.pid"
    path.write_text(content)  # written before start times were kept; pid 1 runs (not this process's child)
    assert live_pid(path) == 1


@pytest.mark.parametrize("content", ["", "0\n", "-1\n", "abc\n", "0 123\n"])
def test_a_pid_file_that_names_no_process_is_never_a_pid(tmp_path, content):
    """kill(0) signals the caller's own group and kill(-1) every process: such a file names nothing."""
    path = tmp_path / "service.pid"
    path.write_text(content)
    assert recorded_pid(path) is None and live_pid(path) is None
    assert Pacs(state=tmp_path, port=1).down() is False


def test_a_pid_now_held_by_another_process_is_not_ours_and_is_never_signalled(tmp_path):
    """A pid file from before a reboot or a container restart names a pid that another process has now."""
    other = subprocess.Popen(SLEEP, start_new_session=True)
    try:
        processes = Processes(state=tmp_path)
        processes.pid_file("zenml").parent.mkdir()
        for path in (tmp_path / "orthanc.pid", processes.pid_file("zenml")):
            path.write_text(f"{other.pid} 12345\n")  # the start time of the process that had this pid then
        assert Pacs(state=tmp_path, port=1).pid() is None and processes.pid("zenml") is None
        assert processes.group("zenml") is None and processes.stop("zenml") is False
        assert Pacs(state=tmp_path, port=1).down() is False
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()


def test_a_stop_ends_what_is_left_of_the_group_when_its_leader_is_gone(tmp_path):
    """A service whose leader died (the `mlflow` command, OOM-killed) while its workers hold the port: `down` stops
    the workers, or the next `up` finds the port taken."""
    processes = Processes(state=tmp_path)
    leader = processes.spawn("mlflow", ["sh", "-c", f"{' '.join(SLEEP[:2])} '{SLEEP[2]}' & wait"])
    deadline = time.monotonic() + 30
    while len(subprocess.run(["pgrep", "-g", str(leader)], capture_output=True, text=True).stdout.split()) < 2:
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    os.kill(leader, signal.SIGKILL)  # the leader alone: its worker runs on
    os.waitid(os.P_PID, leader, os.WEXITED | os.WNOWAIT)
    assert processes.pid("mlflow") is None and processes.group("mlflow") == leader
    assert processes.stop("mlflow") is True
    assert not group_running(leader) and not processes.pid_file("mlflow").exists()


def test_the_pacs_refuses_a_port_that_another_process_holds(tmp_path):
    """Another Orthanc there would answer the health check for one that could not start (a second checkout with the
    default port and credentials): refused before anything is started or written."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        pacs = Pacs(state=tmp_path / "pacs", port=taken.getsockname()[1])
        with pytest.raises(PacsError, match=f"port {pacs.port} is taken by a process this PACS did not start"):
            pacs.up()
    assert not (tmp_path / "pacs").exists()


def test_a_zenml_server_that_exits_while_the_others_start_is_reported_at_once(tmp_path):
    """`up` spawns ZenML first and awaits it last: one that died meanwhile is said to have exited, not waited on to
    the end of the timeout and then called unhealthy."""
    from infra.team.credentials import Credentials
    from infra.team.s3 import S3
    from infra.team.zenml import ZenMLServer
    from support import free_port

    processes = Processes(state=tmp_path, timeout_s=120)
    pid = processes.spawn("zenml", [sys.executable, "-c", "import sys; print('no database'); sys.exit(3)"])
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited before anyone awaits it
    server = ZenMLServer(processes, Credentials(tmp_path), S3(processes), port=free_port())
    with pytest.raises(TeamStackError, match="zenml exited while starting") as error:
        server.await_started()
    assert "no database" in str(error.value)
