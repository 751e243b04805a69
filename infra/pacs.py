"""A local PACS: Orthanc (Debian's ``orthanc``, ``orthanc-dicomweb`` and ``orthanc-webviewer``) with DICOMweb and a web
viewer, as this user's own process.

    python -m infra.pacs up | down | status        (make pacs, make pacs-down)

DICOMweb at ``http://127.0.0.1:$XRAY_PACS_PORT/dicom-web`` (default 8042), Orthanc Explorer at
``http://127.0.0.1:$XRAY_PACS_PORT/app/explorer.html`` and the Web Viewer plugin's page of a series at
``http://127.0.0.1:$XRAY_PACS_PORT/web-viewer/app/viewer.html?series=<Orthanc series id>`` (Explorer's series pages
link to it). Storage and index under ``.pacs/`` (kept by ``down``, so
studies survive a restart). HTTP basic authentication is always on, with ``XRAY_PACS_USER`` / ``XRAY_PACS_PASSWORD``
(local defaults ``xray`` / ``xray-local-pacs``); the state folder (the studies, the generated config holding them,
the log) is this user's only (0700, Orthanc run with umask 077) and the password is printed nowhere. Remote access is
refused (``RemoteAccessAllowed: false``: Orthanc 1.10 has no bind address, it answers loopback clients only), and the
DICOM (DIMSE) port is off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path

from infra.pidfile import live_pid, write_pid
from xray.environment import REPO_ROOT
from xray.storage.dicomweb import DEFAULT_PASSWORD, DEFAULT_USER, PASSWORD_ENV, USER_ENV

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
WEB_VIEWER = Path("/usr/share/orthanc/plugins/libOrthancWebViewer.so")
PORT_ENV = "XRAY_PACS_PORT"


class PacsError(RuntimeError):
    pass


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
    if not found or not PLUGIN.is_file() or not WEB_VIEWER.is_file():
        raise PacsError(
            "Orthanc and its DICOMweb and Web Viewer plugins are not installed: make pacs installs them "
            "(apt-get install orthanc orthanc-dicomweb orthanc-webviewer)"
        )
    return found


@dataclass
class Pacs:
    state: Path = REPO_ROOT / ".pacs"
    port: int = int(os.environ.get(PORT_ENV, "8042"))
    user: str = os.environ.get(USER_ENV, DEFAULT_USER)
    password: str = os.environ.get(PASSWORD_ENV, DEFAULT_PASSWORD)
    timeout_s: float = 60.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        """The source URI batch inference takes: ``--images dicomweb://127.0.0.1:PORT/dicom-web``."""
        return f"dicomweb://127.0.0.1:{self.port}/dicom-web"

    @property
    def _pid_file(self) -> Path:
        return self.state / "orthanc.pid"

    @property
    def log(self) -> Path:
        return self.state / "orthanc.log"

    def config(self) -> dict:
        storage = self.state / "storage"
        return {
            "Name": "xray-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "DicomServerEnabled": False,
            "HttpVerbose": False,
            "StableAge": 2,
            "Plugins": [str(PLUGIN), str(WEB_VIEWER)],
            "WebViewer": {"CachePath": str(self.state / "webviewer-cache")},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"},
        }

    def pid(self) -> int | None:
        return live_pid(self._pid_file)

    def healthy(self) -> bool:
        request = urllib.request.Request(f"{self.url}/system")
        request.add_header("Authorization", "Basic " + b64encode(f"{self.user}:{self.password}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=3) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def up(self, die_with_parent: bool = False) -> subprocess.Popen | None:
        """Start Orthanc (unless this state's one runs) and wait until it answers. ``die_with_parent``: the process
        is killed when the calling process exits (tests)."""
        if self.pid() is not None:  # ours runs: awaited until it answers (a busy machine answers late), never doubled
            deadline = time.monotonic() + self.timeout_s
            while not self.healthy():
                if self.pid() is None or time.monotonic() > deadline:
                    raise PacsError(f"the running Orthanc does not answer on {self.url}; see {self.log}")
                time.sleep(0.3)
            return None
        with socket.socket() as probe:  # another Orthanc there would answer for this one, which could not start
            if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                raise PacsError(f"port {self.port} is taken by a process this PACS did not start ({PORT_ENV})")
        binary = orthanc_binary()
        # The storage holds patients' studies, the config the password: this user's only.
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state.chmod(0o700)
        (self.state / "storage").mkdir(exist_ok=True)
        config = self.state / "orthanc.json"
        descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(descriptor, 0o600)  # a file there before keeps its mode through O_TRUNC
        with os.fdopen(descriptor, "w") as handle:
            json.dump(self.config(), handle, indent=1)
        with open(self.log, "ab") as log:
            process = subprocess.Popen(
                [binary, str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.state,
                start_new_session=not die_with_parent,
                preexec_fn=_die_with_parent if die_with_parent else None,
                umask=0o077,
            )
        write_pid(self._pid_file, process.pid)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise PacsError(f"Orthanc exited while starting; see {self.log}:\n" + _tail(self.log))
            if self.healthy():
                return process
            time.sleep(0.3)
        process.kill()
        raise PacsError(f"Orthanc did not answer on {self.url} within {self.timeout_s:.0f} s; see {self.log}")

    def down(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if self.pid() is None:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        self._pid_file.unlink(missing_ok=True)
        return True


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    pacs = Pacs()
    try:
        if args.command == "up":
            pacs.up()
            print(
                f"PACS up: DICOMweb {pacs.url}/dicom-web (as --images {pacs.dicomweb}), viewer "
                f"{pacs.url}/app/explorer.html, user {pacs.user} (password from {PASSWORD_ENV}, or the local default); "
                f"storage {pacs.state / 'storage'}",
                file=sys.stderr,
            )
        elif args.command == "down":
            print("PACS stopped" if pacs.down() else "PACS was not running", file=sys.stderr)
        else:
            running = pacs.pid() is not None and pacs.healthy()
            print(json.dumps({"running": running, "dicomweb": pacs.dicomweb, "storage": str(pacs.state / "storage")}))
    except PacsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
