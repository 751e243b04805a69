import subprocess
import sys
from types import SimpleNamespace

import pytest

from support import ROOT, isolated_env, run_command
from xray.errors import ScheduleError
from xray.schedule import CronError, schedule_name, validate_aws_cron


@pytest.mark.parametrize(
    "expression, body",
    [
        ("cron(0 3 ? * MON *)", "0 3 ? * MON *"),
        ("cron(15 10 ? * 6L 2022-2023)", "15 10 ? * 6L 2022-2023"),
        ("0/15 * 1 * ? *", "0/15 * 1 * ? *"),
        ("cron(0 8 1,15 JAN-JUN ? *)", "0 8 1,15 JAN-JUN ? *"),
        ("cron(0 12 ? * MON#1 *)", "0 12 ? * MON#1 *"),
    ],
)
def test_valid_aws_cron(expression, body):
    assert validate_aws_cron(expression) == body


@pytest.mark.parametrize(
    "expression, message",
    [
        ("cron(0 3 * * MON)", "six fields"),
        ("0 3 * * *", "six fields"),
        ("cron(0 3 * * MON *)", "exactly one of day-of-month and day-of-week"),
        ("cron(0 3 ? * ? *)", "exactly one of day-of-month and day-of-week"),
        ("cron(61 3 ? * MON *)", "minutes field '61'"),
        ("cron(0 24 ? * MON *)", "hours field '24'"),
        ("cron(0 3 ? 13 MON *)", "month field '13'"),
        ("cron(0 3 ? * FUNDAY *)", "day-of-week field 'FUNDAY'"),
        ("cron(0/0 3 ? * MON *)", "step '/0'"),
        ("cron(0 3 ? * MON 1800)", "year field '1800'"),
    ],
)
def test_invalid_aws_cron(expression, message):
    with pytest.raises(CronError, match=message):
        validate_aws_cron(expression)


def _orchestrator(schedulable: bool, flavor: str):
    return SimpleNamespace(config=SimpleNamespace(is_schedulable=schedulable), flavor=flavor, name=f"my-{flavor}")


def test_schedule_reaches_with_options_when_the_orchestrator_can_schedule(tmp_path):
    from pipelines import launch, training
    from xray.config.pipeline import PipelineConfig
    from xray.requests import TrainingRequest

    schedule = launch.schedule_for("cron(0 3 ? * MON *)", _orchestrator(True, "sagemaker"), "xray-sagemaker")
    assert schedule.cron_expression == "0 3 ? * MON *"
    request = TrainingRequest(config=PipelineConfig(zenml={"settings": {}}), schedule="cron(0 3 ? * MON *)")
    options = launch.launch_options(request, schedule, tmp_path, training.MODEL)
    assert options["schedule"] is schedule
    assert options["config_path"].endswith("zenml_run_config.yaml")


def test_local_orchestrator_cannot_schedule():
    from pipelines import launch

    with pytest.raises(ScheduleError, match="stack 'default' cannot schedule runs: its orchestrator 'my-local'"):
        launch.schedule_for("cron(0 3 ? * MON *)", _orchestrator(False, "local"), "default")
    with pytest.raises(CronError):  # the expression is checked before the stack
        launch.schedule_for("cron(0 3 * * MON *)", _orchestrator(False, "local"), "default")


@pytest.mark.slow
def test_cli_on_the_local_stack_says_so_in_one_line(tmp_path):
    env = isolated_env(tmp_path)  # stores of its own
    config = str(ROOT / "configs/training_smoke.yaml")
    result = run_command([ROOT / "run.py", "--config", config, "--schedule", "cron(0 3 ? * MON *)"], env, 300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: stack 'xray-local' cannot schedule runs")
    listing = run_command([ROOT / "run.py", "--list-schedules"], env, 300)
    assert listing.returncode == 0 and "zenml pipeline schedule delete" in listing.stdout


def test_schedule_name_is_the_same_in_every_process():
    """str hashes are salted per process: the name must not come from hash(), or every call adds a schedule."""
    code = "from xray.schedule import schedule_name; print(schedule_name('cron(0 3 ? * MON *)'))"
    names = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(names) == 1 and names.pop().startswith("chest-xray-training-")
    assert schedule_name("cron(0 3 ? * MON *)") != schedule_name("cron(0 4 ? * MON *)")
