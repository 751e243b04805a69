"""DICOM validators no one here wrote, for the tests of the objects written back to a PACS: dciodvfy (dicom3tools,
the IOD checker), dsrdump (dcmtk, the SR reader) and dcmjs in Node.js (the parser OHIF and Cornerstone use).

make test installs the Debian packages (scripts/system_packages.sh) and these helpers install dcmjs from npm into
.cache/ (git-ignored) on first use; a tool that is missing fails the test with the command that installs it, never
skips it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from infra.team.processes import TeamStackError, npm_install
from support import ROOT

DCMJS_VERSION = "0.52.2"
DCMJS_HOME = ROOT / ".cache" / f"dcmjs-{DCMJS_VERSION}"
READ_REPORT = Path(__file__).parent / "tools" / "dcmjs_report.js"


def tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run make system-packages (it installs dicom3tools, dcmtk and Node.js)")
    return found


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's ``Error`` lines for one file (its warnings are not errors: a private coding scheme, DICOMDIR)."""
    result = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dsrdump(path: Path) -> subprocess.CompletedProcess:
    """dcmtk's reading of one SR document, with its template identification (+Pt)."""
    return subprocess.run([tool("dsrdump"), "+Pt", str(path)], capture_output=True, text=True, timeout=60)


def dcmjs_home() -> Path:
    """dcmjs from npm, installed once into .cache/ (under a lock: two test workers may ask at once)."""
    DCMJS_HOME.mkdir(parents=True, exist_ok=True)
    with open(DCMJS_HOME / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (DCMJS_HOME / "node_modules" / "dcmjs" / "package.json").is_file():
            tool("npm")
            try:
                npm_install(DCMJS_HOME, f"dcmjs@{DCMJS_VERSION}")
            except TeamStackError as error:
                pytest.fail(str(error))
    return DCMJS_HOME / "node_modules"


def dcmjs_reports(paths: list[Path]) -> list[dict]:
    """What dcmjs reads in each report (tools/dcmjs_report.js), in one Node.js process."""
    env = os.environ | {"NODE_PATH": str(dcmjs_home())}
    result = subprocess.run(
        [tool("node"), str(READ_REPORT), *map(str, paths)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)
