"""The command line (cli/): one command per job, the earlier --pipeline forms, one request per job, each launch replaced by a recorder."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from xray.config_file import load_config

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "training_smoke.yaml"


JOBS = {
    "train": "pipelines.training:run_training",
    "tune": "pipelines.tuning:run_tuning",
    "infer": "pipelines.inference:run_inference",
    "monitor": "pipelines.monitoring:run_monitoring",
    "evaluate": "pipelines.evaluation:run_evaluation",
    "feedback": "pipelines.feedback:run_feedback",
    "decide": "pipelines.decisions:decide",
    "audit": "pipelines.audit:run_audit",
}


@pytest.fixture
def launched(monkeypatch):
    """Every job's launch replaced by a recorder of the request it was handed (no ZenML store is touched)."""
    import importlib

    from cli import output
    from cli.app import main
    from pipelines import launch

    requests = []
    for job, target in JOBS.items():
        module, name = target.split(":")
        monkeypatch.setattr(
            importlib.import_module(module),
            name,
            lambda request, job=job: requests.append((job, request)) or {"job": job},
        )
    monkeypatch.setattr(launch, "on_stack", lambda config, name: config)
    monkeypatch.setattr(output, "import_tensorflow_quietly", lambda: None)
    return main, requests


def invoke(main, *args):
    return CliRunner().invoke(
        main,
        [*args, "--config", str(SMOKE)] if args and not args[0].startswith("-") else [*args, "--config", str(SMOKE)],
    )


def test_the_help_lists_one_command_per_job_and_each_its_own_options(launched):
    main, _ = launched
    listed = CliRunner().invoke(main, ["--help"]).output
    for command in (
        "train",
        "tune",
        "infer",
        "monitor",
        "evaluate",
        "feedback",
        "approve",
        "reject",
        "rollback",
        "audit",
    ):
        assert f"  {command} " in listed, command
    own = CliRunner().invoke(main, ["infer", "--help"]).output
    assert "--images" in own and "--shards" in own and "--if-changed" not in own
    assert CliRunner().invoke(main, ["--pipeline", "inference", "--help"]).output == own


@pytest.mark.parametrize(
    "args, job, fields",
    [
        ([], "train", {"if_changed": False, "schedule": None}),
        (["--pipeline", "training", "--if-changed"], "train", {"if_changed": True}),
        (
            ["train", "--no-cache", "--dataset-uri", "s3://b/k.zip"],
            "train",
            {"no_cache": True, "dataset_uri": "s3://b/k.zip"},
        ),
        (["--pipeline=inference", "--images", "x", "--shards", "3"], "infer", {"shards": 3, "images": "x"}),
        (
            ["infer", "--images", "dicomweb://p:8042/dicom-web", "--write-back", "--site", "b"],
            "infer",
            {"write_back": True, "site": "b"},
        ),
        (
            ["infer", "--images", "dicomweb://p:8042/dicom-web", "--write-back", "--heatmaps"],
            "infer",
            {"write_back": True, "heatmaps": True},
        ),
        (
            ["--pipeline", "inference", "--images", "dicomweb://p:8042/dicom-web", "--write-back", "--heatmaps"],
            "infer",
            {"write_back": True, "heatmaps": True, "images": "dicomweb://p:8042/dicom-web"},
        ),
        (["infer", "--images", "dicomweb://p:8042/dicom-web", "--write-back"], "infer", {"heatmaps": False}),
        (["--pipeline", "monitoring", "--images", "x", "--fail-on-drift"], "monitor", {"fail_on_drift": True}),
        (["monitor", "--images", "x"], "monitor", {"model_version": "champion", "from_log": False}),
        (["monitor", "--images", "x", "--model-version", "2"], "monitor", {"model_version": "2"}),
        (["monitor", "--from-log"], "monitor", {"from_log": True, "images": None}),
        (["--pipeline", "monitoring", "--from-log"], "monitor", {"from_log": True, "images": None}),
        (
            ["evaluate", "--dataset-uri", "s.zip", "--recalibrate-fraction", "0.3"],
            "evaluate",
            {"recalibrate_fraction": 0.3},
        ),
        (["--pipeline", "feedback", "--labels", "l.csv", "--period", "month"], "feedback", {"period": "month"}),
        (
            ["approve", "--model-version", "2", "--reviewer", "alice", "--reason", "ok"],
            "decide",
            {"action": "approve", "reviewer": "alice"},
        ),
        (["rollback", "--to", "1", "--reason", "alarms"], "decide", {"action": "rollback", "model_version": "1"}),
        (["--stack", "local", "rollback", "--to", "1", "--reason", "x"], "decide", {"action": "rollback"}),
        (["--log-level", "info", "approve", "--model-version", "2", "--reason", "x"], "decide", {"action": "approve"}),
        (
            ["approve", "--model-version", "2", "--operating-point", "b:0123456789ab", "--reason", "x"],
            "decide",
            {"operating_point": "b:0123456789ab"},
        ),
        (["audit", "verify"], "audit", {"action": "verify", "as_json": False}),
        (["audit", "show", "--json"], "audit", {"action": "show", "as_json": True}),
        (["--stack", "local", "audit", "show"], "audit", {"action": "show"}),
        (
            ["audit", "approve-plan", "--reviewer", "Dr. R", "--reason", "agreed"],
            "audit",
            {"action": "approve-plan", "reviewer": "Dr. R", "reason": "agreed"},
        ),
    ],
)
def test_each_command_hands_its_job_one_request(launched, args, job, fields):
    """The forms of earlier releases (--pipeline X) reach the same job as the commands."""
    main, requests = launched
    result = CliRunner().invoke(main, [*args, "--config", str(SMOKE)])
    assert result.exit_code == 0, result.output
    ((launched_job, request),) = requests
    assert launched_job == job and {k: getattr(request, k) for k in fields} == fields
    assert request.config.model_dump() == load_config(SMOKE).model_dump()


def test_seed_flag_overrides_the_config_seed(launched):
    main, requests = launched
    assert CliRunner().invoke(main, ["train", "--config", str(SMOKE), "--seed", "7"]).exit_code == 0
    config = requests[0][1].config
    assert config.seed == 7 and config.model_dump(exclude={"seed"}) == load_config(SMOKE).model_dump(exclude={"seed"})
    assert yaml.safe_load(SMOKE.read_text()).get("seed", 42) != 7


def test_seed_must_be_an_integer(launched):
    main, requests = launched
    result = CliRunner().invoke(main, ["--config", str(SMOKE), "--seed", "seven"])
    assert result.exit_code == 2 and "is not a valid integer" in result.output and not requests


def test_verbosity_flags_set_the_project_and_third_party_levels(launched, monkeypatch):
    import logging

    from cli import output

    main, _ = launched
    monkeypatch.setenv("ZENML_LOGGING_VERBOSITY", "INFO")
    assert CliRunner().invoke(main, ["--config", str(SMOKE)]).exit_code == 0
    assert logging.getLogger("xray").level == logging.INFO and logging.getLogger("botocore").level == logging.WARNING
    assert CliRunner().invoke(main, ["--config", str(SMOKE), "-q"]).exit_code == 0
    assert logging.getLogger("xray").level == logging.WARNING and not output.State.verbose
    assert CliRunner().invoke(main, ["--config", str(SMOKE), "-v"]).exit_code == 0
    assert logging.getLogger("xray").level == logging.DEBUG and logging.getLogger("werkzeug").level == logging.INFO
    assert output.State.verbose and __import__("os").environ["ZENML_LOGGING_VERBOSITY"] == "DEBUG"
    assert CliRunner().invoke(main, ["--config", str(SMOKE), "--log-level", "error"]).exit_code == 0
    assert logging.getLogger("xray").level == logging.ERROR and logging.getLogger("mlflow").level == logging.ERROR
    both = CliRunner().invoke(main, ["--config", str(SMOKE), "-v", "-q"])
    assert both.exit_code == 2 and "contradict" in both.output
    output.configure_logging("info")  # leave the process as the other tests expect it


def test_the_tensorflow_banner_is_dropped_and_other_import_output_kept(capfd, monkeypatch):
    import builtins
    import os

    from cli import output

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
    output.import_tensorflow_quietly()
    err = capfd.readouterr().err
    assert "a real warning from the import" in err and "oneDNN" not in err and "absl" not in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, expected",
    [
        # (The earlier release's form, `run.py --list-schedules`, runs in tests/xray/core/test_schedule.py.)
        (["run.py", "schedules"], "zenml pipeline schedule delete"),
        (["run.py", "--help"], "infer"),
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

    from support import isolated_env

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
            "--site belongs to evaluate and feedback and infer, not monitor",
        ),
        (["--pipeline", "inference", "--images", "x", "--labels", "l.csv"], "--labels belongs to feedback, not infer"),
        (["--pipeline", "feedback"], "Missing option '--labels'"),
        (
            ["--pipeline", "inference", "--images", "x", "--recalibrate-fraction", "0.3"],
            "--recalibrate-fraction belongs to evaluate",
        ),
        (["--pipeline", "inference", "--images", "x", "--if-changed"], "--if-changed belongs to train, not infer"),
        (["monitor"], "monitor needs --images (a batch to check) or --from-log (the prediction log)"),
        (
            ["--pipeline", "monitoring", "--from-log", "--images", "x"],
            "--from-log estimates every version in the prediction log; --images belongs to a batch (monitor --images)",
        ),
        (
            ["monitor", "--from-log", "--model-version", "2", "--fail-on-drift"],
            "--fail-on-drift and --model-version belong to a batch",
        ),
        (["--if-changed", "--schedule", "0 3 * * 1"], "--if-changed checks once, before a launch"),
        (["infer", "--images", "x", "--write-back"], "--write-back needs --images dicomweb://"),
        (["infer", "--images", "dicomweb://p:8042/dicom-web", "--heatmaps"], "--heatmaps needs --write-back and"),
        (["--pipeline", "inference", "--images", "x", "--write-back", "--heatmaps"], "--heatmaps needs --write-back"),
        (["infer", "--images", "x", "--heatmaps"], "--heatmaps needs --write-back and --images dicomweb://"),
        (["infer", "--images", "x", "--shards", "2", "--explain", "3"], "--shards needs no --explain"),
        (["tune"], "tune needs a `tuning:` section in the config"),
        (["approve", "--model-version", "2", "--reviewer", "a"], "Missing option '--reason'"),
        (["approve", "--reviewer", "a", "--reason", "ok"], "Missing option '--model-version'"),
        (["approve", "--model-version", "champion", "--reason", "ok"], "a decision names a version number"),
        (["rollback", "--reviewer", "a", "--reason", "ok"], "Missing option '--to'"),
        (
            ["reject", "--model-version", "2", "--reason", "x", "--operating-point", "b:ab"],
            "--operating-point belongs to approve, not reject",
        ),
        (
            ["approve", "--model-version", "2", "--reason", "x", "--operating-point", "b"],
            "--operating-point takes SITE:ID",
        ),
        (["--pipeline", "scoring"], "--pipeline 'scoring' is not one of"),
        (["audit", "approve-plan", "--reviewer", "a"], "Missing option '--reason'"),
        (["audit", "approve-plan", "--reason", " "], "audit approve-plan needs --reason"),
        (["audit", "verify", "--json"], "--json belongs to audit show, not audit"),
    ],
)
def test_an_option_of_another_job_or_a_contradiction_is_one_line_and_no_run(launched, args, message):
    main, requests = launched
    result = CliRunner().invoke(main, [*args, "--config", str(SMOKE)])
    assert result.exit_code == 2 and message in result.output and not requests, result.output


def test_a_malformed_labels_file_is_one_line_and_no_run(monkeypatch, tmp_path):
    from cli import output
    from cli.app import main
    from pipelines import launch

    runs = []
    monkeypatch.setattr(launch, "launch", lambda *args, **kwargs: runs.append(args) or {})
    monkeypatch.setattr(launch, "on_stack", lambda config, name: config)
    monkeypatch.setattr(output, "import_tensorflow_quietly", lambda: None)
    labels = tmp_path / "labels.csv"
    labels.write_text("sha256,label\nab,NORMAL\ncd,MAYBE\n")
    output_folder = tmp_path / "feedback"
    args = ["--config", str(SMOKE), "--pipeline", "feedback", "--labels", str(labels), "--output", str(output_folder)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and not runs and not output_folder.exists()
    assert result.output.strip().splitlines() == [
        "error: labels labels.csv: unknown label 'MAYBE' on line 3 (1 such rows); labels are NORMAL or PNEUMONIA"
    ]


def test_fail_on_degradation_prints_each_alert_and_exits_4_after_the_summary(launched, monkeypatch):
    from cli.common import DEGRADATION_EXIT_CODE
    from pipelines import feedback

    main, _ = launched
    alert = "sensitivity degraded in period 2026-W49, site north, v3: 0.400 (95% CI 0.25-0.58, 30 PNEUMONIA) ..."
    monkeypatch.setattr(feedback, "run_feedback", lambda request: {"alerts": [alert], "labels": 120})
    args = ["--config", str(SMOKE), "--pipeline", "feedback", "--labels", "x.csv"]
    result = CliRunner().invoke(main, [*args, "--fail-on-degradation"])
    assert result.exit_code == DEGRADATION_EXIT_CODE == 4
    assert f"error: {alert}" in result.output and '"labels": 120' in result.output
    assert CliRunner().invoke(main, args).exit_code == 0, "without the flag an alert is reported, not fatal"


@pytest.mark.parametrize(
    "fields", [{"from_log": True}, {"images": "x"}, {"images": "x", "model_version": "2", "fail_on_drift": True}]
)
def test_a_monitoring_request_survives_the_round_trip_a_step_input_makes(fields):
    """ZenML hands a step its request dumped and validated again: --from-log's (no version) and a batch's (champion
    by default) come back equal, not refused as an explicit --model-version."""
    from xray.requests import MonitoringRequest

    request = MonitoringRequest(config=load_config(SMOKE), **fields)
    assert request.model_version == (None if request.from_log else fields.get("model_version", "champion"))
    assert MonitoringRequest.model_validate(request.model_dump()) == request
    assert MonitoringRequest.model_validate_json(request.model_dump_json()) == request
