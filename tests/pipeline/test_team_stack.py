"""The team stack end to end: a ZenML server, an MLflow server on PostgreSQL with artifacts in S3 (s3rver), the
ZenML stack `team`, a smoke training run on it (conftest.trained), both REST APIs, a real browser, and a restart.

The last test takes the stack down and up again; the tests before it and test_use_the_model find it up.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
MODEL = "chest-xray-classifier"
SCREENSHOTS = ROOT / "outputs" / "team_stack"


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def bucket_keys(team) -> list[str]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=team.info["s3_endpoint"],
        aws_access_key_id="S3RVER",
        aws_secret_access_key="S3RVER",
        region_name="us-east-1",
    )
    bucket = team.info["artifact_store"].split("/")[2]
    return [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for item in page.get("Contents", [])
    ]


def running(pid: int, wait_s: float = 15) -> bool:
    """Whether ``pid`` still runs after up to ``wait_s``: a zombie (exited, not yet reaped by its parent) does not."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z":
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)


def zenml_steps(team, run_id: str) -> list[dict]:
    page = get(f"{team.info['zenml_url']}/api/v1/steps?pipeline_run_id={run_id}&hydrate=true&size=100")
    return page["items"]


def mlflow_api(team, path: str) -> dict:
    return get(f"{team.info['mlflow_tracking_uri']}/api/2.0/mlflow/{path}")


def test_a_second_up_is_a_no_op(team):
    again = team.stack("up")
    assert again["services"] == {
        "s3": "running",
        "postgres": "running",
        "mlflow": "running",
        "zenml": "running",
        "stack": "registered",
    }
    # PostgreSQL is installed on these machines: MLflow's backend is a real SQL server, not SQLite.
    assert again["backend_store"].startswith("postgresql://") and again["notices"] == []


def test_a_run_on_the_team_stack_lives_in_its_servers_and_bucket(team, trained):
    *_, summary = trained
    assert summary["mlflow_tracking_uri"] == team.info["mlflow_tracking_uri"].rstrip("/")
    assert summary["mlflow_tracking_uri"].startswith("http://")
    assert len(summary["steps"]) == 7 and set(summary["steps"].values()) == {"completed"}, summary["steps"]

    # ZenML's REST API: the run, on the stack `team`, with every step completed.
    zenml = team.info["zenml_url"]
    run = get(f"{zenml}/api/v1/runs/{summary['pipeline_run_id']}?hydrate=true")
    assert run["body"]["status"] == "completed" and run["resources"]["stack"]["name"] == "team"
    steps = zenml_steps(team, summary["pipeline_run_id"])
    assert {s["name"]: s["body"]["status"] for s in steps} == summary["steps"]

    # Every artifact of the run is in the bucket, none on local disk.
    uris = [
        version["body"]["uri"]
        for step in steps
        for versions in step["resources"]["outputs"].values()
        for version in versions
    ]
    assert len(uris) >= 20 and all(uri.startswith(team.info["artifact_store"] + "/") for uri in uris), uris
    keys = bucket_keys(team)
    bucket = team.info["artifact_store"].split("/")[2]
    missing = [uri for uri in uris if not any(key.startswith(uri.split(f"{bucket}/", 1)[1]) for key in keys)]
    assert not missing, missing
    local = [
        path
        for folder in (team.home, team.state / "zenml")
        for path in folder.rglob("*")
        if path.is_file() and "local_stores" in path.parts
    ]
    assert not local, local[:10]

    # MLflow's REST API: the run with its metrics, the new version, the champion alias; artifacts proxied to S3.
    mlflow_run = mlflow_api(team, f"runs/get?run_id={summary['mlflow_run_id']}")["run"]
    assert mlflow_run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in mlflow_run["data"]["metrics"]}
    assert metrics["test_auc"] == pytest.approx(summary["metrics"]["test_auc"])
    version = mlflow_api(team, f"model-versions/get?name={MODEL}&version={summary['model_version']}")["model_version"]
    assert version["run_id"] == summary["mlflow_run_id"] and version["status"] == "READY"
    champion = mlflow_api(team, f"registered-models/alias?name={MODEL}&alias=champion")["model_version"]
    assert summary["promoted"] and champion["version"] == summary["model_version"]
    assert any(key.startswith("mlflow/") and key.endswith("/MLmodel") for key in keys)
    assert not (ROOT / "mlartifacts").exists() or not any((ROOT / "mlartifacts").rglob("MLmodel"))

    # The ZenML Model version of the run follows the alias: stage production.
    models = get(f"{zenml}/api/v1/models?name={MODEL}")["items"]
    versions = get(f"{zenml}/api/v1/model_versions?model={models[0]['id']}&size=100")["items"]
    production = [v for v in versions if v["body"]["stage"] == "production"]
    assert [v["id"] for v in production] == [run["resources"]["model_version"]["id"]]


def test_the_dashboards_show_the_run_metrics_and_model_in_a_browser(team, trained):
    """Headless Chromium from Debian's packages, driven by selenium through Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    *_, summary = trained
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(
            "the browser test needs Chromium and its driver: apt-get install chromium chromium-driver "
            "(.ci/run installs them)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1400"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def page_showing(url: str, *texts: str, screenshot: str) -> str:
        browser.get(url)
        try:
            WebDriverWait(browser, 90).until(
                lambda b: all(t in b.find_element(By.TAG_NAME, "body").text for t in texts)
            )
        finally:
            browser.save_screenshot(str(SCREENSHOTS / screenshot))
        return browser.find_element(By.TAG_NAME, "body").text

    try:
        run_name = get(f"{team.info['zenml_url']}/api/v1/runs/{summary['pipeline_run_id']}")["name"]
        text = page_showing(
            f"{team.info['zenml_url']}/projects/default/runs/{summary['pipeline_run_id']}",
            run_name,
            "Total Steps",
            screenshot="zenml_run.png",
        )
        steps = len(summary["steps"])
        assert re.search(rf"Total Steps\s+{steps}\b", text) and re.search(rf"Completed\s+{steps}\b", text), text[:2000]
        assert "Add your account details" not in text  # the onboarding form was answered by `team_stack up`
        mlflow_run = mlflow_api(team, f"runs/get?run_id={summary['mlflow_run_id']}")["run"]
        experiment = mlflow_run["info"]["experiment_id"]
        page_showing(
            f"{team.info['mlflow_tracking_uri']}/#/experiments/{experiment}/runs/{summary['mlflow_run_id']}",
            mlflow_run["info"]["run_name"],
            "test_auc",
            screenshot="mlflow_run.png",
        )
        page_showing(
            f"{team.info['mlflow_tracking_uri']}/#/models/{MODEL}/versions/{summary['model_version']}",
            f"Version {summary['model_version']}",
            mlflow_run["info"]["run_name"],
            screenshot="mlflow_model_version.png",
        )
        # The registered model's page lists its versions with their aliases (no tags there to mention champion).
        page_showing(
            f"{team.info['mlflow_tracking_uri']}/#/models/{MODEL}",
            f"Version {summary['model_version']}",
            "champion",
            screenshot="mlflow_model.png",
        )
    finally:
        browser.quit()
    assert all(
        (SCREENSHOTS / name).stat().st_size > 10_000
        for name in ("zenml_run.png", "mlflow_run.png", "mlflow_model_version.png", "mlflow_model.png")
    )


def test_a_failed_run_is_failed_in_both_servers(team, trained, tmp_path):
    """A bad archive on the team stack: one error line (a traceback only with -v), and both REST APIs say FAILED."""
    from conftest import dataset_entries, write_zip

    home, *_ = trained
    bad = write_zip(tmp_path / "no_test.zip", dataset_entries(splits=("train",)))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "--stack",
            "team",
            "--config",
            str(home / "smoke.yaml"),
            "--dataset-uri",
            str(bad),
            "-v",
        ],
        cwd=ROOT,
        env=team.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" in result.stderr  # -v keeps the traceback of an expected failure
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no folder with both train/ and test/" in last, last

    request = urllib.request.Request(
        f"{team.info['mlflow_tracking_uri']}/api/2.0/mlflow/runs/search",
        method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps(
            {
                "experiment_ids": [
                    mlflow_api(team, "experiments/get-by-name?experiment_name=chest-xray-training")["experiment"][
                        "experiment_id"
                    ]
                ],
                "order_by": ["attributes.start_time DESC"],
                "max_results": 1,
            }
        ).encode(),
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        latest = json.loads(response.read())["runs"][0]
    tags = {t["key"]: t["value"] for t in latest["data"]["tags"]}
    assert latest["info"]["status"] == "FAILED" and tags["failed_step"] == "unzip_and_validate"
    assert "no folder with both train/ and test/" in tags["error"]
    runs = get(f"{team.info['zenml_url']}/api/v1/runs?sort_by=desc:created&size=1")["items"]
    assert runs[0]["name"] == latest["info"]["run_name"] and runs[0]["body"]["status"] == "failed"


def test_the_stack_comes_down_and_up_with_its_runs_and_artifacts(team, trained):
    *_, summary = trained
    keys_before = set(bucket_keys(team))
    pids = {path.stem: int(path.read_text()) for path in (team.state / "run").glob("*.pid")}
    postmaster = team.state / "postgres" / "postmaster.pid"
    pids["postgres"] = int(postmaster.read_text().split()[0])
    assert set(pids) == {"s3", "mlflow", "zenml", "postgres"}

    down = team.stack("down")
    assert sorted(down["stopped"]) == ["mlflow", "postgres", "s3", "zenml"] and down["client_returned_to_local_store"]
    alive = {name: pid for name, pid in pids.items() if running(pid)}
    assert not alive, alive
    for port in team.ports.values():
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
    probe = team.home / "store_type.py"
    probe.write_text("from zenml.client import Client; print(Client().zen_store.type.value)\n")
    store = subprocess.run(
        [sys.executable, str(probe)], cwd=ROOT, env=team.env, capture_output=True, text=True, timeout=120
    )
    assert store.stdout.strip().splitlines()[-1] == "sql", store.stderr[-2000:]

    up = team.stack("up")
    assert up["services"] == {
        "s3": "started",
        "postgres": "started",
        "mlflow": "started",
        "zenml": "started",
        "stack": "registered",
    }
    assert set(bucket_keys(team)) >= keys_before
    assert get(f"{team.info['zenml_url']}/api/v1/runs/{summary['pipeline_run_id']}")["body"]["status"] == "completed"
    # An artifact loaded through the ZenML client from S3, and a model file read through MLflow's artifact proxy.
    # A script file, not `python -c`: without a .zen folder (a fresh clone) ZenML takes its source root from the
    # main module's file.
    script = team.home / "load_metrics.py"
    script.write_text(
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from zenml.client import Client; "
        f"run = Client().get_pipeline_run('{summary['pipeline_run_id']}'); "
        "print(json.dumps(run.steps['evaluate_model'].outputs['metrics'][0].load()['flat']['test_auc']))\n"
    )
    loaded = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=team.env, capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == pytest.approx(summary["metrics"]["test_auc"])
    mlmodel = next(key for key in keys_before if key.startswith("mlflow/") and key.endswith("/MLmodel"))
    with urllib.request.urlopen(
        f"{team.info['mlflow_tracking_uri']}/api/2.0/mlflow-artifacts/artifacts/{mlmodel.split('/', 1)[1]}", timeout=30
    ) as response:
        assert b"python_function" in response.read()
    version = mlflow_api(team, f"model-versions/get?name={MODEL}&version={summary['model_version']}")["model_version"]
    assert version["run_id"] == summary["mlflow_run_id"]
