"""The suite's fork server (tests/forked.py): a command forked from it behaves as the same command in a fresh
interpreter (arguments, environment, folder, TMPDIR, output, exit code, threads and atexit at exit, the summary of a
real run.py job), and what could differ (the log options, a variable read at import) still starts a fresh one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from forked import SERVER
from support import ROOT, isolated_env, run_command

pytestmark = pytest.mark.slow  # starts the fork server: the imports of a command, once

PROBE = """
import atexit, json, os, sys, tempfile, threading, time
from pathlib import Path

def late():
    time.sleep(0.3)
    Path(sys.argv[1], "thread").write_text("joined")

threading.Thread(target=late).start()
atexit.register(lambda: Path(sys.argv[1], "atexit").write_text("ran"))
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "name": __name__, "path0": sys.path[0], "variable": os.environ.get("XRAY_PROBE"),
    "tmp": tempfile.gettempdir(), "tensorflow": "tensorflow" in sys.modules,
}))
sys.stdout.flush()
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[2]))
"""


def fresh(args: list, env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)


def test_a_forked_script_gets_its_arguments_environment_folder_and_exits_as_python(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = isolated_env(tmp_path, XRAY_PROBE="mine", TMPDIR=str(tmp_path))
    forked = SERVER.run([str(script), str(tmp_path), "7"], env, 120, tmp_path)
    seen = json.loads(forked.stdout)
    assert forked.returncode == 7 and forked.stderr == "to stderr\n"
    assert seen["argv"] == [str(script), str(tmp_path), "7"] and seen["name"] == "__main__"
    assert seen["cwd"] == str(tmp_path) and seen["path0"] == str(tmp_path) and seen["variable"] == "mine"
    assert seen["tmp"] == str(tmp_path), "the command's TMPDIR, not the server's cached one"
    assert seen["tensorflow"], "forked from the server that imported it"
    assert (tmp_path / "thread").read_text() == "joined" and (tmp_path / "atexit").read_text() == "ran"
    assert not fresh([script, tmp_path, "0"], env, tmp_path).returncode
    asleep = tmp_path / "asleep.py"
    asleep.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        SERVER.run([str(asleep)], env, 1, tmp_path)


def test_a_forked_run_py_job_prints_what_a_fresh_interpreter_prints(tmp_path):
    env = isolated_env(tmp_path)
    command = [ROOT / "run.py", "audit", "verify", "--config", ROOT / "configs" / "training_smoke.yaml"]
    assert SERVER.can_run([str(a) for a in command], env)
    first = fresh(command, env)
    again = run_command(command, env, 300)
    assert first.returncode == again.returncode == 0, first.stderr[-2000:] + again.stderr[-2000:]
    assert json.loads(first.stdout) == json.loads(again.stdout)
    missing = [ROOT / "run.py", "--config", tmp_path / "missing.yaml"]
    one, other = fresh(missing, env), run_command(missing, env, 300)
    assert one.returncode == other.returncode == 2
    assert one.stderr.splitlines()[-1] == other.stderr.splitlines()[-1] and other.stderr.startswith("error:")


@pytest.mark.parametrize(
    "extra, change",
    [
        (["-v"], {}),
        (["--log-level", "error"], {}),
        (["-q"], {}),
        ([], {"HOME": "/elsewhere"}),  # Keras reads its folder at import
        ([], {"TF_CPP_MIN_LOG_LEVEL": "0"}),  # TensorFlow's C++ logging, set at import
        ([], {"ZENML_LOGGING_COLORS_DISABLED": "true"}),  # read by ZenML at import
    ],
)
def test_what_is_set_before_the_imports_starts_a_fresh_interpreter(tmp_path, extra, change):
    env = isolated_env(tmp_path)
    command = [str(ROOT / "run.py"), "audit", "verify"]
    assert SERVER.can_run(command, env) and SERVER.can_run(command, env | {"XRAY_ANYTHING": "1", "TMPDIR": "/x"})
    assert not SERVER.can_run([*command, *extra], env | change)
