"""The team stack's processes: one pid file and one log per service under the state folder, started in a session of
their own with umask 077, awaited until their health URL answers, stopped with their whole process group."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from infra.pidfile import group_running, live_pid, ours, read_pid, write_pid

logger = logging.getLogger("team_stack")


class TeamStackError(RuntimeError):
    pass


@dataclass
class Processes:
    """The services this stack started, by name: ``state/run/NAME.pid`` and ``state/logs/NAME.log``."""

    state: Path
    host: str = "127.0.0.1"
    timeout_s: float = 120.0

    def url(self, port: int) -> str:
        return f"http://{self.host}:{port}"

    def pid_file(self, name: str) -> Path:
        return self.state / "run" / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def pid(self, name: str) -> int | None:
        """The pid of our running ``name``, None when it has no pid file or its process is gone."""
        return live_pid(self.pid_file(name))

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> int:
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        self.pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log(name), "ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=os.environ | (env or {}),
                start_new_session=True,
                cwd=self.state,
                umask=0o077,  # what a service writes (ZenML's database, its secrets) is its owner's only
            )
        write_pid(self.pid_file(name), process.pid)
        return process.pid

    def wait_healthy(self, name: str, url: str, pid: int | None = None) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if healthy(url, timeout_s=10):  # a loaded machine answers late, not never
                return
            if pid is not None and self.pid(name) is None:
                raise TeamStackError(
                    f"{name} exited while starting; last lines of {self.log(name)}:\n" + tail(self.log(name))
                )
            time.sleep(0.5)
        raise TeamStackError(
            f"{name} not healthy at {url} after {self.timeout_s:.0f} s; see {self.log(name)}:\n" + tail(self.log(name))
        )

    def running(self, name: str, url: str) -> bool:
        """Whether our ``name`` runs: a live process from our pid file is awaited until it answers, never started twice
        (a busy machine can keep a health check waiting longer than its timeout)."""
        pid = self.pid(name)
        if pid is None:
            return False
        self.wait_healthy(name, url, pid)
        return True

    def port_free(self, name: str, port: int) -> None:
        with socket.socket() as probe:
            if probe.connect_ex((self.host, port)) == 0:
                raise TeamStackError(
                    f"{name}: port {port} on {self.host} is taken by a process this stack did not start; "
                    f"stop it or choose another port (--{name}-port)"
                )

    def group(self, name: str) -> int | None:
        """Our ``name``'s process group while any of it runs: the group its leader (the pid file's) started, also once
        the leader is gone and its workers run on (Linux reuses no pid while a group of that id has members); None
        when nothing of it runs or the pid is now another process's."""
        pid, recorded = read_pid(self.pid_file(name))
        return pid if pid is not None and ours(pid, recorded) and group_running(pid) else None

    def stop(self, name: str) -> bool:
        group = self.group(name)
        if group is None:
            self.pid_file(name).unlink(missing_ok=True)
            return False
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.group(name) is not None:
            time.sleep(0.2)
        if self.group(name) is not None:
            logger.warning("%s (process group %d) did not stop on SIGTERM; killing it", name, group)
            os.killpg(group, signal.SIGKILL)
        self.pid_file(name).unlink(missing_ok=True)
        return True


def run(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """A command that must succeed (initdb, pg_ctl, npm): its error output in the error when it does not."""
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ | (env or {}))
    if result.returncode != 0:
        raise TeamStackError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout).strip()[-2000:]}")


def npm_install(home: Path, package: str) -> None:
    """One npm package into `home`/node_modules, npm run in `home` as its own project (a package.json there).

    Not `npm install --prefix home`: a prefix moves npm's global configuration to `home`/etc/npmrc, so the system's
    (Debian's /usr/etc/npmrc, where a registry's CA file is set) is skipped, and behind a TLS-inspecting proxy every
    fetch then fails its certificate and is retried for a minute or more before npm falls back to its cache."""
    home.mkdir(parents=True, exist_ok=True)
    manifest = home / "package.json"
    if not manifest.is_file():
        manifest.write_text('{"private": true}\n')
    command = ["npm", "install", "--no-audit", "--no-fund", "--loglevel", "error", package]
    result = subprocess.run(command, cwd=home, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise TeamStackError(f"npm install {package} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


def healthy(url: str, timeout_s: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status < 400
    except Exception:  # noqa: BLE001 - anything but an answer means "not up yet"
        return False


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"
