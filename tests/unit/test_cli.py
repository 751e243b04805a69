"""run.py's argument handling, with the pipeline launch replaced by a recorder."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from xray.config_file import load_config

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "training_smoke.yaml"


@pytest.fixture
def launched(monkeypatch):
    import run
    from pipelines import launch

    calls = []
    monkeypatch.setattr(launch, "run_training", lambda config, *args: calls.append(config) or {"seed": config.seed})
    monkeypatch.setattr(launch, "on_stack", lambda config, name: config)  # no ZenML store is touched here
    monkeypatch.setattr(run, "import_tensorflow_quietly", lambda: None)
    return run, calls


def test_seed_flag_overrides_the_config_seed(launched):
    run, calls = launched
    result = CliRunner().invoke(run.main, ["--config", str(SMOKE), "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert calls[0].seed == 7
    assert calls[0].model_dump(exclude={"seed"}) == load_config(SMOKE).model_dump(exclude={"seed"})


def test_without_the_flag_the_yaml_seed_stands(launched):
    run, calls = launched
    result = CliRunner().invoke(run.main, ["--config", str(SMOKE)])
    assert result.exit_code == 0, result.output
    assert calls[0].seed == yaml.safe_load(SMOKE.read_text()).get("seed", 42) != 7


def test_seed_must_be_an_integer(launched):
    run, calls = launched
    result = CliRunner().invoke(run.main, ["--config", str(SMOKE), "--seed", "seven"])
    assert result.exit_code == 2 and "is not a valid integer" in result.output and not calls


def test_verbosity_flags_set_the_project_and_third_party_levels(launched, monkeypatch):
    import logging

    run, calls = launched
    monkeypatch.setenv("ZENML_LOGGING_VERBOSITY", "INFO")
    assert CliRunner().invoke(run.main, ["--config", str(SMOKE)]).exit_code == 0
    assert logging.getLogger("xray").level == logging.INFO and logging.getLogger("botocore").level == logging.WARNING
    assert CliRunner().invoke(run.main, ["--config", str(SMOKE), "-q"]).exit_code == 0
    assert logging.getLogger("xray").level == logging.WARNING and not run.VERBOSE
    assert CliRunner().invoke(run.main, ["--config", str(SMOKE), "-v"]).exit_code == 0
    assert logging.getLogger("xray").level == logging.DEBUG and logging.getLogger("werkzeug").level == logging.INFO
    assert run.VERBOSE and __import__("os").environ["ZENML_LOGGING_VERBOSITY"] == "DEBUG"
    assert CliRunner().invoke(run.main, ["--config", str(SMOKE), "--log-level", "error"]).exit_code == 0
    assert logging.getLogger("xray").level == logging.ERROR and logging.getLogger("mlflow").level == logging.ERROR
    both = CliRunner().invoke(run.main, ["--config", str(SMOKE), "-v", "-q"])
    assert both.exit_code == 2 and "contradict" in both.output
    run.configure_logging("info")  # leave the process as the other tests expect it


def test_the_tensorflow_banner_is_dropped_and_other_import_output_kept(capfd, monkeypatch):
    import builtins
    import os

    import run

    real_import = builtins.__import__

    def noisy_import(name, *args, **kwargs):
        if name == "tensorflow":
            os.write(
                2,
                b"I0000 port.cc:153] oneDNN custom operations are on. You may see...\n"
                b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
                b"a real warning from the import\n",
            )
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", noisy_import)
    run.import_tensorflow_quietly()
    err = capfd.readouterr().err
    assert "a real warning from the import" in err and "oneDNN" not in err and "absl" not in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, expected",
    [
        (["run.py", "--list-schedules"], "zenml pipeline schedule delete"),
        (["scripts/pacs_demo_upload.py", "--help"], "usage: pacs_demo_upload.py"),
        (["scripts/verify_registered.py", "--help"], "Usage: verify_registered.py"),
    ],
)
def test_the_documented_commands_run_from_a_python_without_the_projects_packages(tmp_path, command, expected):
    """`python3 run.py ...` and `python3 scripts/...` as the README prints them, from an interpreter outside the
    project's .venv (the Python the venv was made from, which has none of its packages): each re-runs itself in the
    .venv."""
    import subprocess
    import sys

    from conftest import isolated_env

    base = Path(sys.base_prefix) / "bin" / "python3"
    probe = subprocess.run([str(base), "-c", "import zenml"], capture_output=True, timeout=60)
    assert probe.returncode != 0, f"{base} has zenml: pick an interpreter without the project's packages"
    result = subprocess.run(
        [str(base), str(ROOT / command[0]), *command[1:]],
        cwd=tmp_path,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout


def test_the_readme_and_docs_print_no_command_that_a_fresh_shell_lacks():
    """A fresh Debian login shell has python3 and no python: every command line of the README and docs/ that starts
    a Python starts python3 (run.py and scripts/ find the .venv) or the .venv's own."""
    import re

    bare = re.compile(r"(?:^|[\s`(;|&])python(?=\s)")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if bare.search(line)
    ]
    assert not found, "\n".join(found)


def test_make_pacs_uses_an_existing_venv_as_it_is_and_the_servers_ports_are_variables(tmp_path):
    """A clone that shares another's venv: make pacs must not reinstall the project into it (the shared venv would
    then run this clone's code). make ui and make serve take UI_PORT and SERVE_PORT."""
    import subprocess
    import sys

    shared = tmp_path / "venv"
    (shared / "bin").mkdir(parents=True)
    (shared / "bin" / "python").symlink_to(sys.executable)

    def dry(*args: str) -> str:
        result = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    for target in ("pacs", "pacs-down"):
        plan = dry(target, f"VENV={shared}")
        assert "pip install" not in plan and f"{shared}/bin/python -m infra.pacs" in plan, plan
    assert "pip install" in dry("pacs-down", f"VENV={tmp_path / 'none'}"), "without a venv, make setup makes one"
    assert "--port 5123" in dry("ui", "UI_PORT=5123") and "--host 127.0.0.1" in dry("ui")
    assert "--host 127.0.0.1 --port 5124" in dry("serve", "SERVE_PORT=5124")


def test_make_monitor_without_images_says_that_images_is_required():
    import subprocess

    result = subprocess.run(["make", "-s", "monitor"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "make monitor needs IMAGES=" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--pipeline", "monitoring", "--images", "x", "--site", "b"],
            "--site belongs to --pipeline evaluation, inference or feedback",
        ),
        (["--pipeline", "inference", "--images", "x", "--labels", "l.csv"], "--labels, --period and --fail-on"),
        (["--pipeline", "feedback"], "--pipeline feedback needs --labels FILE.csv"),
        (
            ["--pipeline", "inference", "--images", "x", "--recalibrate-fraction", "0.3"],
            "--recalibrate-fraction belongs",
        ),
        (["--pipeline", "inference", "--images", "x", "--if-changed"], "--if-changed belongs to --pipeline training"),
        (["--if-changed", "--schedule", "0 3 * * 1"], "--if-changed checks once, before a launch"),
    ],
)
def test_flags_of_another_pipeline_are_refused_in_one_line(launched, args, message):
    run, calls = launched
    result = CliRunner().invoke(run.main, ["--config", str(SMOKE), *args])
    assert result.exit_code == 2 and message in result.output and not calls


def test_if_changed_reaches_the_training_launch(launched, monkeypatch):
    run, _ = launched
    from pipelines import launch

    seen = []
    monkeypatch.setattr(launch, "run_training", lambda config, *args: seen.append(args) or {"skipped": "x"})
    result = CliRunner().invoke(run.main, ["--config", str(SMOKE), "--if-changed"])
    assert result.exit_code == 0, result.output
    assert seen == [(None, False, None, True)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["approve", "--model-version", "2", "--reviewer", "a"], "approve needs --reason TEXT"),
        (["approve", "--reviewer", "a", "--reason", "ok"], "approve needs --model-version N (a version number)"),
        (["rollback", "--reviewer", "a", "--reason", "ok"], "rollback needs --to N"),
    ],
)
def test_a_decision_without_who_why_or_which_version_is_refused(launched, args, message):
    run, calls = launched
    result = CliRunner().invoke(run.main, ["--config", str(SMOKE), *args])
    assert result.exit_code == 2 and message in result.output and not calls


def test_approve_reject_and_rollback_reach_the_decision(launched, monkeypatch):
    run, _ = launched
    from pipelines import launch

    seen = []
    monkeypatch.setattr(launch, "decide", lambda config, *args: seen.append(args) or {"action": args[0]})
    for args in (
        ["approve", "--model-version", "2", "--reviewer", "alice", "--reason", "checked"],
        ["reject", "--model-version", "3", "--reviewer", "bob", "--reason", "no"],
        ["rollback", "--to", "1", "--reviewer", "ops", "--reason", "alarms"],
        ["approve", "--model-version", "2", "--operating-point", "site-b:0123456789ab", "--reason", "re-fitted"],
    ):
        result = CliRunner().invoke(run.main, ["--config", str(SMOKE), *args])
        assert result.exit_code == 0, result.output
    assert seen == [
        ("approve", "2", "alice", "checked", None),
        ("reject", "3", "bob", "no", None),
        ("rollback", "1", "ops", "alarms", None),
        ("approve", "2", None, "re-fitted", "site-b:0123456789ab"),
    ]
    refused = CliRunner().invoke(
        run.main,
        ["--config", str(SMOKE), "reject", "--model-version", "2", "--reason", "x", "--operating-point", "site-b"],
    )
    assert refused.exit_code == 2 and "--operating-point belongs to approve" in refused.output


def test_a_malformed_labels_file_is_one_line_and_no_run(launched, monkeypatch, tmp_path):
    run, _ = launched
    from pipelines import launch

    runs = []
    monkeypatch.setattr(launch, "launch", lambda *args, **kwargs: runs.append(args) or {})
    labels = tmp_path / "labels.csv"
    labels.write_text("sha256,label\nab,NORMAL\ncd,MAYBE\n")
    output = tmp_path / "feedback"
    args = ["--config", str(SMOKE), "--pipeline", "feedback", "--labels", str(labels), "--output", str(output)]
    result = CliRunner().invoke(run.main, args)
    assert result.exit_code == 1 and not runs and not output.exists()
    assert result.output.strip().splitlines() == [
        "error: labels labels.csv: unknown label 'MAYBE' on line 3 (1 such rows); labels are NORMAL or PNEUMONIA"
    ]


def test_fail_on_degradation_prints_each_alert_and_exits_4_after_the_summary(launched, monkeypatch, tmp_path):
    run, _ = launched
    from pipelines import launch

    alert = "sensitivity degraded in period 2026-W49, site north, v3: 0.400 (95% CI 0.25-0.58, 30 PNEUMONIA) ..."
    monkeypatch.setattr(launch, "run_feedback", lambda *args: {"alerts": [alert], "labels": 120})
    args = ["--config", str(SMOKE), "--pipeline", "feedback", "--labels", "x.csv"]
    result = CliRunner().invoke(run.main, [*args, "--fail-on-degradation"])
    assert result.exit_code == run.DEGRADATION_EXIT_CODE == 4
    assert f"error: {alert}" in result.output and '"labels": 120' in result.output
    assert CliRunner().invoke(run.main, args).exit_code == 0, "without the flag an alert is reported, not fatal"
