"""Which ZenML stack a run uses (infra.stacks), on a real ZenML client store in a temporary folder, and the team
stack's pure parts (infra.team_stack and its services under infra/team/). The team stack's services are exercised in
tests/pipelines/test_team_stack.py."""

import json
import subprocess
import sys

import pytest

from support import isolated_env

SCRIPT = r"""
import json
from zenml.client import Client
from infra.stacks import use_stack, LOCAL_STACK, LOCAL_TRACKER
from xray.errors import ConfigError
from zenml.enums import StackComponentType as Kind

out = {}
out["first"] = use_stack(None, "sqlite:////tmp/a/mlflow.db")
out["again"] = use_stack(None, "sqlite:////tmp/a/mlflow.db")
out["moved"] = use_stack(LOCAL_STACK, "sqlite:////tmp/b/mlflow.db")
out["trackers"] = len(Client().list_stack_components(type=Kind.EXPERIMENT_TRACKER).items)
for name in ("default", "team"):
    try:
        use_stack(name, "sqlite:////tmp/a/mlflow.db")
        out[name] = "no error"
    except ConfigError as error:
        out[name] = str(error)
out["active"] = Client().active_stack_model.name
print(json.dumps(out))
"""


@pytest.mark.slow
def test_runs_use_xray_local_by_default_and_named_stacks_must_exist_with_a_tracker(tmp_path):
    script = tmp_path / "use_stacks.py"  # a file: ZenML resolves its source root from the main module's path
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["first"] == ["xray-local", "sqlite:////tmp/a/mlflow.db"]
    assert out["again"] == out["first"] and out["trackers"] == 1  # registered once, reused
    assert out["moved"] == ["xray-local", "sqlite:////tmp/b/mlflow.db"]  # the tracker follows the local store
    assert "has no MLflow experiment tracker" in out["default"]
    assert "no ZenML stack 'team'" in out["team"] and "make team-stack" in out["team"]
    assert out["active"] == "xray-local"  # a refused stack leaves the active one alone


def test_team_stack_defaults_and_addresses(tmp_path):
    from infra.team_stack import TeamStack, main

    stack = TeamStack(state=tmp_path, zenml_port=1, mlflow_port=2, s3_port=3, pg_port=4)
    info = stack.info()
    assert (info["zenml_url"], info["mlflow_tracking_uri"], info["s3_endpoint"]) == (
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
        "http://127.0.0.1:3",
    )
    assert info["artifact_store"] == "s3://xray-team/zenml" and info["mlflow_artifacts"] == "s3://xray-team/mlflow"
    status = stack.status()["running"]
    assert status == {"s3": False, "mlflow": False, "zenml": False, "postgres": False}  # nothing listens there
    assert stack.down()["stopped"] == []  # nothing was started in this folder: nothing to stop
    assert (
        main(
            [
                "status",
                "--state",
                str(tmp_path),
                "--zenml-port",
                "1",
                "--mlflow-port",
                "2",
                "--s3-port",
                "3",
                "--pg-port",
                "4",
            ]
        )
        == 0
    )


def test_the_s3rver_listing_fix_applies_once_and_refuses_unknown_code(tmp_path):
    import pytest

    from infra.team.processes import TeamStackError
    from infra.team.s3 import S3RVER_PATCH, patch_s3rver

    source = tmp_path / S3RVER_PATCH[0]
    source.parent.mkdir(parents=True)
    source.write_text("before\n" + S3RVER_PATCH[1] + "after\n")
    patch_s3rver(tmp_path)
    patched = source.read_text()
    assert S3RVER_PATCH[1] not in patched and patched == "before\n" + S3RVER_PATCH[2] + "after\n"
    patch_s3rver(tmp_path)
    assert source.read_text() == patched  # idempotent
    source.write_text("some other version\n")
    with pytest.raises(TeamStackError, match="not s3rver"):
        patch_s3rver(tmp_path)


def test_without_postgresql_mlflow_falls_back_to_sqlite_with_a_notice(tmp_path, monkeypatch):
    from infra.team import postgres
    from infra.team_stack import TeamStack

    monkeypatch.setattr(postgres, "postgres_bin", lambda: None)
    stack = TeamStack(state=tmp_path)
    assert stack.postgres.start() == "absent (SQLite)"
    assert stack.postgres.backend_store_uri() == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert stack.info()["backend_store"] == stack.postgres.backend_store_uri()
    assert len(stack.notices) == 1 and "SQLite" in stack.notices[0] and (tmp_path / "mlflow").is_dir()
    assert stack.postgres.server_env() == {}  # no PGPASSWORD for a SQLite store
    assert stack.postgres.stop() is False


def test_a_stale_postmaster_pid_is_no_running_server_and_stop_signals_nothing(tmp_path, monkeypatch):
    """A killed PostgreSQL (kill -9, the OOM killer, a reset) leaves postmaster.pid, whose pid is then gone or, after a
    reset, another process's: neither is the server, so `status` says so and `down` neither fails nor signals it."""
    from infra.team import postgres
    from infra.team_stack import TeamStack

    monkeypatch.setattr(postgres, "postgres_bin", lambda: tmp_path / "bin")  # no pg_ctl: a call to it would fail
    monkeypatch.setattr(postgres.Postgres, "home", property(lambda self: self.state))
    stack = TeamStack(state=tmp_path / "state")
    stack.postgres.data.mkdir(parents=True)
    pid_file = stack.postgres.data / "postmaster.pid"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path)
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=stack.postgres.data)
    try:
        for pid in (ended.pid, other.pid):
            pid_file.write_text(f"{pid}\n{stack.postgres.data}\n")
            assert not stack.postgres.running() and not stack.status()["running"]["postgres"]
            assert stack.postgres.stop() is False and stack.down()["stopped"] == []
        assert other.poll() is None  # not signalled
        pid_file.write_text(f"{server.pid}\n{stack.postgres.data}\n")  # a process in the cluster's folder
        assert stack.postgres.running()
    finally:
        other.kill()
        server.kill()


SLOW_SERVER = """
import http.server, sys, time
class Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(float(sys.argv[2]))
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Slow).serve_forever()
"""


def listening(port: int, timeout_s: float = 20) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.1)


@pytest.mark.slow  # a server that answers in 3 s, on purpose
def test_a_slow_service_of_ours_is_awaited_not_started_twice_and_a_strangers_port_is_refused(tmp_path):
    """A busy machine kept MLflow's /health waiting past the 2-s probe: `up` started a second server, whose pid then
    replaced the first's in the pid file, and `down` left the real one running."""
    from infra.team.processes import TeamStackError
    from infra.team_stack import TeamStack
    from support import free_port

    port = free_port()
    stack = TeamStack(state=tmp_path, mlflow_port=port, timeout_s=30)
    ours = stack.processes.spawn("mlflow", [sys.executable, "-c", SLOW_SERVER, str(port), "3"])
    try:
        listening(port)
        assert stack.mlflow.start() == "running"  # each answer takes 3 s, longer than one probe's 2-s timeout
        assert stack.processes.pid("mlflow") == ours
    finally:
        assert stack.processes.stop("mlflow") and stack.processes.pid("mlflow") is None

    stranger = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(port), "0"])
    try:
        listening(port)
        with pytest.raises(TeamStackError, match=f"mlflow: port {port} .* did not start"):
            stack.mlflow.start()
        assert stack.processes.pid("mlflow") is None and stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
