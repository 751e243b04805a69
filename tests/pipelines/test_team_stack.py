"""The team stack end to end: a ZenML server, an MLflow server on PostgreSQL with artifacts in S3 (s3rver), the
ZenML stack `team`, a smoke training run on it (conftest.trained), both REST APIs, a real browser, batch inference,
`mlflow models serve`, the model card and a site evaluation against the tracking server, and a restart.

The tests share one stack and one run: they run in file order, on one worker under `make test` (--dist loadfile).
The last test takes the stack down and up again.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fixtures.dicom_factory import radiograph
from stacks import champion_probabilities
from steps import __all__ as training_steps
from support import MINI_ZIP, ROOT, free_port, run_command
from xray.serving import batch

pytestmark = pytest.mark.slow
MODEL = "chest-xray-classifier"
SCREENSHOTS = ROOT / "outputs" / "team_stack"


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
    page = team.get(f"{team.info['zenml_url']}/api/v1/steps?pipeline_run_id={run_id}&hydrate=true&size=100")
    return page["items"]


def mlflow_api(team, path: str) -> dict:
    return team.get(f"{team.info['mlflow_tracking_uri']}/api/2.0/mlflow/{path}")


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


def test_the_state_folder_is_its_owners_and_a_wider_mode_is_narrowed_by_up(team):
    """Secrets at rest: the state folder 0700, every file that holds a secret 0600 (ZenML's database holds the
    tracker's password); `up` narrows a wider mode and says so in one line."""
    import stat

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    database = team.state / "zenml" / "zenml.db"
    assert mode(team.state) == 0o700 and mode(team.state / "credentials.json") == 0o600 and mode(database) == 0o600
    files = [p for name in ("zenml", "mlflow", "logs") for p in (team.state / name).rglob("*") if p.is_file()]
    assert files and {oct(mode(p)) for p in files} == {oct(0o600)}
    team.state.chmod(0o755)
    database.chmod(0o644)
    again = team.stack("up")
    assert mode(team.state) == 0o700 and mode(database) == 0o600
    assert f"{team.state.name} 0755 -> 0700" in " ".join(again["secured"]) and "zenml.db 0644 -> 0600" in " ".join(
        again["secured"]
    )
    (line,) = [line for line in team.last_stack_stderr.splitlines() if "secured the team stack's state folder" in line]
    assert "zenml.db 0644 -> 0600" in line


def test_postgresql_asks_for_the_generated_password_which_no_log_or_status_holds(team):
    """initdb with SCRAM and a generated password (state/credentials.json, mode 0600): a connection without it or
    with a wrong one is refused; MLflow's server has it from its environment, never from a URI or a command line."""
    import stat

    from infra.team.postgres import postgres_bin

    credentials = team.state / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    password = json.loads(credentials.read_text())["postgres_password"]
    psql = [str(postgres_bin() / "psql"), "-h", "127.0.0.1", "-p", str(team.ports["pg"]), "-U", "mlflow", "-w"]
    psql += ["-d", "mlflow", "-tAc", "SELECT 1"]
    environment = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    anonymous = subprocess.run(psql, capture_output=True, text=True, env=environment)
    assert anonymous.returncode != 0 and "password" in anonymous.stderr, anonymous.stderr
    wrong = subprocess.run(psql, capture_output=True, text=True, env=environment | {"PGPASSWORD": "not-it"})
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr, wrong.stderr
    right = subprocess.run(psql, capture_output=True, text=True, env=environment | {"PGPASSWORD": password})
    assert right.returncode == 0 and right.stdout.strip() == "1", right.stderr
    assert password not in json.dumps(team.stack("status")) and password not in json.dumps(team.info)
    for path in [*team.state.glob("logs/*"), team.state / "team_stack.json"]:
        assert password not in path.read_text(errors="replace"), path


def test_every_service_but_s3_refuses_anonymous_and_wrong_credentials(team, trained):
    """ZenML (OAuth2 password login) and MLflow (basic-auth) answer 401 without credentials or with wrong ones, and
    work with the generated ones; no password is in a log, the status, the stack's files or its bucket's logs. s3rver
    verifies no keys: it listens on loopback only (docs/OPERATIONS.md)."""
    import base64

    from infra.team.zenml import ZENML_USER, zenml_login

    def status(url: str, headers: dict | None = None) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    zenml, mlflow = team.info["zenml_url"], team.info["mlflow_tracking_uri"]
    runs, experiments = f"{zenml}/api/v1/runs?size=1", f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    assert status(runs) == 401 and status(runs, {"Authorization": "Bearer not-a-token"}) == 401
    assert zenml_login(zenml, ZENML_USER, "not-it") is None and status(runs, team.auth_headers(runs)) == 200
    wrong = {"Authorization": "Basic " + base64.b64encode(b"trainer:not-it").decode()}
    assert status(experiments) == 401 and status(experiments, wrong) == 401
    assert status(experiments, team.auth_headers(experiments)) == 200
    assert status(f"{mlflow}/health") == 200 and status(f"{zenml}/health") == 200  # health checks stay open
    assert team.info["s3_endpoint"].startswith("http://127.0.0.1:")
    passwords = set(team.credentials.values())
    texts = [json.dumps(team.stack("status")), json.dumps(team.info), team.training_stderr]
    texts += [path.read_text(errors="replace") for path in team.state.rglob("*.log")]
    texts += [(team.state / "team_stack.json").read_text(), (team.state / "mlflow" / "basic_auth.ini").read_text()]
    leaks = [text[:80] for text in texts for password in passwords if password in text]
    assert not leaks, leaks


def test_the_trainer_cannot_move_champion_and_the_reviewer_approves_as_themself(team, trained):
    """registry.require_approval on the team stack: the trainer's run leaves a candidate; the trainer's approve is one
    clear line (exit 2), so is a typed --reviewer that is not the signed-in account; the reviewer's approval makes it
    champion and the record, the card and the ZenML Model stage name the account that signed in."""
    import mlflow
    from mlflow.tracking import MlflowClient

    home, env, _, summary = trained
    version = summary["model_version"]
    refused = team.decisions["trainer"]
    assert refused.returncode == 2 and refused.stdout == ""
    lines = [line for line in refused.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0] == refused.stderr.strip().splitlines()[-1], refused.stderr[-2000:]
    assert "MLflow refused the approve by account 'trainer'" in lines[0] and "needs MANAGE" in lines[0], lines
    typed = team.decisions["typed name"]
    last = typed.stderr.strip().splitlines()[-1]
    assert (
        typed.returncode == 2 and "--reviewer Dr. Somebody Else is not the MLflow account signed in (reviewer)" in last
    )
    approved = team.decisions["reviewer"]
    assert approved["action"] == "approved" and approved["by"] == "reviewer" and approved["previous_champion"] is None
    assert approved["zenml_stage"] == "production"
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    tags = client.get_model_version(MODEL, version).tags
    assert tags["approval"] == "approved"
    history = [json.loads(v) for k, v in tags.items() if k.startswith("history.")]
    assert [(h["action"], h["by"]) for h in history] == [("approved", "reviewer")]
    assert "smoke model, checked by hand" in history[0]["why"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    card = open(
        mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{version}/model_card.md", dst_path=str(home / "c"))
    ).read()
    assert "approved by reviewer: smoke model, checked by hand" in card

    # The rule is the server's, not the client's: the trainer's own REST call to move champion is refused (403).
    alias = f"{team.info['mlflow_tracking_uri']}/api/2.0/mlflow/registered-models/alias"
    request = urllib.request.Request(
        alias,
        data=json.dumps({"name": MODEL, "alias": "champion", "version": version}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"} | team.auth_headers(alias, "trainer"),
    )
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(request, timeout=30)
    assert denied.value.code == 403 and b"needs MANAGE" in denied.value.read()
    permission = mlflow_api(team, f"registered-models/get?name={MODEL}")["registered_model"]["name"]
    assert permission == MODEL  # the trainer still reads it


def test_a_run_on_the_team_stack_lives_in_its_servers_and_bucket(team, trained):
    *_, summary = trained
    # The default source: a local archive ($CHEST_XRAY_ZIP) staged behind the embedded S3 endpoint, read through S3.
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", team.training_stderr)  # ZenML colours parts of lines
    assert "embedded S3 at http://127.0.0.1" in stderr and "s3://chest-xray/chest_xray.zip" in stderr
    assert summary["mlflow_tracking_uri"] == team.info["mlflow_tracking_uri"].rstrip("/")
    assert summary["mlflow_tracking_uri"].startswith("http://")
    assert set(summary["steps"]) == set(training_steps) and set(summary["steps"].values()) == {"completed"}

    # ZenML's REST API: the run, on the stack `team`, with every step completed.
    zenml = team.info["zenml_url"]
    run = team.get(f"{zenml}/api/v1/runs/{summary['pipeline_run_id']}?hydrate=true")
    assert run["body"]["status"] == "completed" and run["resources"]["stack"]["name"] == "team"
    steps = zenml_steps(team, summary["pipeline_run_id"])
    assert {s["name"]: s["body"]["status"] for s in steps} == summary["steps"]

    # Every artifact of the run is in the bucket, none on local disk.
    outputs = {
        name: version["body"]["uri"]
        for step in steps
        for name, versions in step["resources"]["outputs"].items()
        for version in versions
    }
    uris = list(outputs.values())
    # The way to champion as typed records, each its own artifact (xray.registry.promotion).
    assert {"evaluation", "gate_sets", "gate_scores", "gate_decision", "registration", "data_report"} <= set(outputs)
    assert all(uri.startswith(team.info["artifact_store"] + "/") for uri in uris), uris
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
    # The trainer's run left a pending candidate; the reviewer's approval (``trained``) made it champion.
    champion = mlflow_api(team, f"registered-models/alias?name={MODEL}&alias=champion")["model_version"]
    assert summary["pending_approval"] and not summary["promoted"]
    assert champion["version"] == summary["model_version"] == team.decisions["reviewer"]["model_version"]
    assert any(key.startswith("mlflow/") and key.endswith("/MLmodel") for key in keys)
    assert not (ROOT / "mlartifacts").exists() or not any((ROOT / "mlartifacts").rglob("MLmodel"))

    # The ZenML Model version of the run follows the alias: stage production.
    models = team.get(f"{zenml}/api/v1/models?name={MODEL}")["items"]
    versions = team.get(f"{zenml}/api/v1/model_versions?model={models[0]['id']}&size=100")["items"]
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
    # Reduced motion and no GPU process: the ZenML login page's animated background otherwise keeps a software-
    # rendering GPU process at 100% of a core, and the page does not answer typed keys within chromedriver's 120 s.
    arguments = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1400")
    for argument in (*arguments, "--force-prefers-reduced-motion", "--disable-gpu"):
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
        run_name = team.get(f"{team.info['zenml_url']}/api/v1/runs/{summary['pipeline_run_id']}")["name"]
        # Signed in through the dashboard's own login form, as a person would.
        browser.get(team.info["zenml_url"])
        fields = WebDriverWait(browser, 90).until(lambda b: b.find_elements(By.CSS_SELECTOR, "form input") or None)
        username = next(f for f in fields if f.get_attribute("type") != "password")
        username.send_keys("default")
        next(f for f in fields if f.get_attribute("type") == "password").send_keys(team.credentials["zenml_password"])
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit], form button").click()
        WebDriverWait(browser, 90).until(
            lambda b: "Log in to your account" not in b.find_element(By.TAG_NAME, "body").text
        )
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
        # MLflow's UI behind basic-auth: the browser sends the reviewer's credentials with every request.
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders", {"headers": team.auth_headers(team.info["mlflow_tracking_uri"], "reviewer")}
        )
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
    from support import dataset_entries, write_zip

    home, *_ = trained
    bad = write_zip(tmp_path / "no_test.zip", dataset_entries(splits=("train",)))
    command = [ROOT / "run.py", "--stack", "team", "--config", home / "smoke.yaml", "--dataset-uri", bad, "-v"]
    result = run_command(command, team.env, 600)
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" in result.stderr  # -v keeps the traceback of an expected failure
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no folder with both train/ and test/" in last, last

    request = urllib.request.Request(
        f"{team.info['mlflow_tracking_uri']}/api/2.0/mlflow/runs/search",
        method="POST",
        headers={"Content-Type": "application/json"} | team.auth_headers(team.info["mlflow_tracking_uri"]),
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
    runs = team.get(f"{team.info['zenml_url']}/api/v1/runs?sort_by=desc:created&size=1")["items"]
    assert runs[0]["name"] == latest["info"]["run_name"] and runs[0]["body"]["status"] == "failed"


def test_the_trainer_cannot_rewrite_the_record_or_the_files_and_a_changed_file_is_refused(team, trained):
    """The security review's requests, as the trainer over HTTP: each a 4xx, and nothing changes (the whole matrix of
    carriers: tests/infra/test_mlflow_auth_server.py). Then one byte of the champion's weights changed in the bucket,
    which checks no keys: batch inference and serving refuse the version in one line; restored, it serves again."""
    import hashlib

    import boto3

    home, env, images, summary = trained
    version = summary["model_version"]
    mlflow_url = team.info["mlflow_tracking_uri"]

    def call(method: str, path: str, body=None, query: str = "", raw: bytes | None = None) -> int:
        url = f"{mlflow_url}{path}{query}"
        data = json.dumps(body).encode() if body is not None else raw
        headers = team.auth_headers(url, "trainer") | ({"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as error:
            return error.code

    def record() -> tuple:
        found = mlflow_api(team, f"model-versions/get?name={MODEL}&version={version}")["model_version"]
        tags = {t["key"]: t["value"] for t in found.get("tags", [])}
        return sorted(found.get("aliases", [])), tags, found.get("description"), found["name"]

    s3 = boto3.client(
        "s3",
        endpoint_url=team.info["s3_endpoint"],
        aws_access_key_id="S3RVER",
        aws_secret_access_key="S3RVER",
        region_name="us-east-1",
    )
    bucket = team.info["artifact_store"].split("/")[2]
    (weights,) = [key for key in bucket_keys(team) if key.startswith("mlflow/") and key.endswith("/data/model.keras")]
    original = s3.get_object(Bucket=bucket, Key=weights)["Body"].read()
    before = record()
    proxied = weights.removeprefix("mlflow/")
    api = "/api/2.0/mlflow"
    attempts = {
        "champion moved by a query string": call(
            "POST",
            f"{api}/registered-models/alias",
            {"name": MODEL, "alias": "champion", "version": version},
            "?alias=candidate",
        ),
        "approval set by a query string": call(
            "POST",
            f"{api}/model-versions/set-tag",
            {"name": MODEL, "version": version, "key": "approval", "value": "rejected"},
            "?value=pending",
        ),
        "weights overwritten through the proxy": call(
            "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{proxied}", raw=b"FORGED by trainer"
        ),
        "renamed": call("POST", f"{api}/registered-models/rename", {"name": MODEL, "new_name": "renamed"}),
        "history forged": call(
            "POST",
            f"{api}/model-versions/set-tag",
            {"name": MODEL, "version": version, "key": "history.20261206", "value": "FORGED by trainer"},
        ),
        "decision rewritten": call(
            "POST",
            f"{api}/model-versions/set-tag",
            {"name": MODEL, "version": version, "key": "promotion_decision", "value": "rejected"},
        ),
        "card rewritten": call(
            "PATCH", f"{api}/model-versions/update", {"name": MODEL, "version": version, "description": "FORGED"}
        ),
    }
    assert all(400 <= status < 500 for status in attempts.values()), attempts
    assert record() == before and s3.get_object(Bucket=bucket, Key=weights)["Body"].read() == original

    changed = bytearray(original)
    changed[len(changed) // 2] ^= 1
    s3.put_object(Bucket=bucket, Key=weights, Body=bytes(changed))
    try:
        refused = team.command("--pipeline", "inference", "--images", str(images), "--output", str(home / "x.csv"))
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert len(errors) == 1 and errors[0].startswith(
            f"error: model version {version} refused: data/model.keras differs from the file registered"
        ), errors
        serving = run_command(["-m", "infra.serve", "--port", "1", "--folder", str(home / "serving")], team.env, 300)
        assert serving.returncode == 2 and serving.stderr.strip().splitlines()[-1] == errors[0]
    finally:
        s3.put_object(Bucket=bucket, Key=weights, Body=original)
    assert (
        hashlib.sha256(s3.get_object(Bucket=bucket, Key=weights)["Body"].read()).digest()
        == hashlib.sha256(original).digest()
    )


def test_batch_inference_on_a_folder(team, trained):
    home, env, images, _ = trained
    (images / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    summary = team.run(
        "--pipeline",
        "inference",
        "--images",
        str(images),
        "--output",
        str(home / "out" / "preds.csv"),
        "--explain",
        "2",
    )
    table = pd.read_csv(home / "out" / "preds.csv", keep_default_na=False, na_values=[""])
    assert list(table.columns) == batch.PREDICTION_COLUMNS
    assert len(table) == 21 and summary["unreadable"] == 1 and summary["rows_written"] == 21
    assert table["sha256"].notna().all() and summary["output"] == str(home / "out" / "preds.csv")
    bad = table[table["status"] == "unreadable"]
    assert bad["path"].str.endswith("corrupt.jpeg").all() and bad["probability"].isna().all()
    assert bad["ood_score"].isna().all() and (bad["reason"] == "not a recognised image format").all()
    good = table[table["status"] != "unreadable"]
    ok = good["status"] == "ok"
    assert len(good) == 20 and set(good.loc[ok, "label"]) <= {"NORMAL", "PNEUMONIA"}
    assert good.loc[~ok, "label"].isna().all()  # out of distribution: no label (an empty field)
    assert set(good["status"]) <= {"ok", "out_of_distribution"} and good["ood_score"].notna().all()
    assert good.loc[good["status"] == "ok", "ood_score"].le(1).all()
    assert summary["out_of_distribution"] == int((good["status"] == "out_of_distribution").sum())
    assert good.loc[good["status"] == "out_of_distribution", "reason"].str.len().gt(0).all()
    np.testing.assert_allclose(good["probability"], champion_probabilities(env, good["path"]), atol=1e-5)
    assert (good["model_version"].astype(str) == "1").all()
    pngs = sorted((home / "out").glob("gradcam_*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)
    (images / "corrupt.jpeg").unlink()
    # Every row is in the prediction log, in the stack's bucket (through ZenML's S3 artifact store), and the
    # feedback pipeline reads it back from there.
    assert summary["prediction_log_rows"] == 21
    assert [key for key in bucket_keys(team) if key.startswith("zenml/prediction_log/date=")]
    answered = table[table["status"] == "ok"]
    labels = pd.DataFrame({"sha256": [*answered["sha256"], "f" * 64], "label": [*answered["label"], "NORMAL"]})
    labels.to_csv(home / "labels.csv", index=False)
    feedback = team.run("--pipeline", "feedback", "--labels", str(home / "labels.csv"), "--output", str(home / "fb"))
    assert feedback["labelled_predictions"] == len(answered) and feedback["unmatched_labels"] == 1
    assert feedback["logged_predictions"] >= 21 and feedback["alerts"] == []
    performance = pd.read_csv(home / "fb" / "performance.csv")
    assert performance["answered"].sum() == len(answered) and (performance["sensitivity"].fillna(1) == 1).all()


def _post(port, body):
    """(status, answer) of POST /invocations; ``body`` a JSON-able object or raw bytes."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=body if isinstance(body, bytes) else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw or b"{}")
        except ValueError:
            return error.code, {"message": raw.decode(errors="replace")}


def test_rest_serving_matches_batch_inference(trained):
    home, env, images, _ = trained
    port = free_port()
    # The scoring server is started as `uvicorn ...` from PATH: put this interpreter's bin first.
    env = env | {"PATH": f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}"}
    # What `make serve` runs: the champion's files checked against its digest, then `mlflow models serve`.
    server = subprocess.Popen(
        [sys.executable, "-m", "infra.serve", "--port", str(port), "--workers", "1", "--folder", str(home / "serving")],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
            assert server.poll() is None, server.stdout.read()[-3000:]
        else:
            pytest.fail("mlflow models serve did not come up")
        image = sorted(images.glob("*.jpeg"))[0]
        status, body = _post(port, {"inputs": [base64.b64encode(image.read_bytes()).decode()]})
        assert status == 200, body
        prediction = body["predictions"][0]
        assert prediction["probability"] == pytest.approx(float(champion_probabilities(env, [image])[0]), abs=1e-5)
        assert prediction["status"] in ("ok", "out_of_distribution") and isinstance(prediction["ood_score"], float)
        assert prediction["label"] in (("NORMAL", "PNEUMONIA") if prediction["status"] == "ok" else ("",))
        assert prediction["model_version"] == "1"
        status, body = _post(port, {"inputs": [base64.b64encode(b"\xff\xd8\xff corrupt").decode()]})
        assert 400 <= status < 500, body
        assert "cannot be decoded" in body.get("message", "")
        # One unreadable image among readable ones does not fail the request: it gets its own row.
        inverted = (255 - np.asarray(Image.open(image).convert("RGB"))).astype("uint8")
        buffer = io.BytesIO()
        Image.fromarray(inverted).save(buffer, format="PNG")
        status, body = _post(
            port,
            {
                "inputs": [
                    base64.b64encode(image.read_bytes()).decode(),
                    base64.b64encode(b"\xff\xd8\xff corrupt").decode(),
                    base64.b64encode(buffer.getvalue()).decode(),
                ]
            },
        )
        assert status == 200, body
        rows = body["predictions"]
        assert rows[0]["probability"] == pytest.approx(prediction["probability"], abs=1e-6)
        assert rows[1]["status"] == "unreadable" and rows[1]["probability"] is None and rows[1]["reason"]
        assert rows[2]["status"] == "out_of_distribution" and rows[2]["ood_score"] > 1
        # The same image as a DICOM (12-bit JPEG-LS, detected by content) scores as the JPEG and names its UIDs.
        dicom_copy = radiograph(image.read_bytes(), bits=12, syntax="jpeg-ls")
        status, body = _post(port, {"inputs": [base64.b64encode(dicom_copy).decode()]})
        assert status == 200, body
        row = body["predictions"][0]
        assert row["probability"] == pytest.approx(prediction["probability"], abs=0.02)
        assert row["sop_instance_uid"].startswith("1.2.") and row["status"] == prediction["status"]
        # Malformed requests: each a 4xx with a message, the worker stays up and answers the next good request.
        good = base64.b64encode(image.read_bytes()).decode()
        zip_buffer = io.BytesIO()
        with zipfile.ZipFile(zip_buffer, "w") as archive:
            archive.writestr("image.dcm", b"x" * 1000)
        hostile = {
            "truncated DICOM": dicom_copy[: len(dicom_copy) // 2],
            "DICOM declaring 65535 x 65535": radiograph(image.read_bytes(), bits=8, Rows=65535, Columns=65535),
            "a zip behind a DICOM preamble": b"\0" * 128 + b"DICM" + zip_buffer.getvalue(),
        }
        malformed = {
            **{case: {"inputs": [base64.b64encode(data).decode()]} for case, data in hostile.items()},
            "not JSON": b"{this is not json",
            "nested list": {"inputs": [[good, good]]},
            "a number": {"inputs": [7]},
            "empty list": {"inputs": []},
            "non-image bytes": {"inputs": [base64.b64encode(b"%PDF-1.4 not an image").decode()]},
            "over the size limit": {"inputs": ["A" * (17 * 2**20)]},
        }
        for case, body in malformed.items():
            status, answer = _post(port, body)
            assert 400 <= status < 500 and answer.get("message"), (case, status, answer)
            assert server.poll() is None, case
            status, answer = _post(port, {"inputs": [good]})
            assert status == 200 and answer["predictions"][0]["probability"] == pytest.approx(
                prediction["probability"], abs=1e-6
            ), case
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_model_card_numbers_equal_logged_metrics(trained):
    import mlflow
    from mlflow.tracking import MlflowClient

    home, env, _, summary = trained
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    version = MlflowClient().get_model_version("chest-xray-classifier", summary["model_version"])
    folder = mlflow.artifacts.download_artifacts(
        f"models:/chest-xray-classifier/{version.version}", dst_path=str(home / "card")
    )
    card = open(os.path.join(folder, "model_card.md")).read()
    metrics = MlflowClient().get_run(summary["mlflow_run_id"]).data.metrics
    for label, key in (
        ("AUC-ROC", "test_auc"),
        ("Sensitivity (PNEUMONIA recall)", "test_sensitivity"),
        ("Specificity (NORMAL recall)", "test_specificity"),
        ("Accuracy", "test_accuracy"),
    ):
        row = re.search(rf"^\| {re.escape(label)} \| ([0-9.]+) \|", card, re.MULTILINE)
        assert row and row.group(1) == f"{metrics[key]:.4f}", (label, row and row.group(1), metrics[key])
    assert f"{metrics['test_auc_ci_low']:.4f} to {metrics['test_auc_ci_high']:.4f}" in card
    assert f"{metrics['threshold']:.4f}, chosen on val only" in card
    assert "Not a medical device" in card and "Single source centre" in card and "grouped by patient" in card


def test_evaluation_on_a_labelled_site_reaches_mlflow_the_version_and_its_card(team, trained, tmp_path):
    """--pipeline evaluation on a folder built from the mini archive, class folders at depth and in any case. A site
    without one of the classes is one error line (tests/xray/data/test_sites.py), like every archive error."""
    import mlflow
    from mlflow.tracking import MlflowClient

    home, env, _, _ = trained
    site = tmp_path / "site"
    with zipfile.ZipFile(MINI_ZIP) as archive:
        for name in archive.namelist():
            if name.startswith("chest_xray/test/") and name.endswith(".jpeg"):
                label, file = name.split("/")[-2:]
                target = site / "export" / "cxr" / (label if label == "NORMAL" else label.lower()) / file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    (site / "export" / "README.txt").write_text("not an image, outside the class folders")
    # The smoke config's calibration (a temperature): a one-epoch model may rank a small share backwards, which
    # Platt scaling refuses (tests/xray/evaluation/test_calibration.py).
    summary = team.run(
        "--pipeline",
        "evaluation",
        "--model-version",
        "1",
        "--config",
        str(home / "smoke.yaml"),
        "--dataset-uri",
        str(site),
        "--site",
        "hospital-b",
        "--recalibrate-fraction",
        "0.5",
    )
    assert summary["site"] == "hospital-b" and summary["model_version"] == "1" and summary["images"] == 47
    for name in ("auc", "accuracy", "sensitivity", "specificity", "ece"):
        metrics = summary["metrics"]
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
    recalibrated = summary["recalibrated"]
    assert recalibrated["calibration_images"] + recalibrated["measured_images"] == 47
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["site"] == "hospital-b" and run.data.tags["model_version"] == "1"
    assert run.data.metrics["site_auc"] == pytest.approx(summary["metrics"]["auc"])
    version = client.get_model_version("chest-xray-classifier", "1")
    site = json.loads(version.tags["site.hospital-b"])  # one tag per site, not one per metric
    assert not [key for key in version.tags if key.startswith("site.hospital-b.")]
    assert site["as_registered"]["auc"] == pytest.approx(summary["metrics"]["auc"], abs=1e-5)
    assert site["run_id"] == summary["mlflow_run_id"] and "meets_policy" in site["recalibrated"]
    # The run's metrics are linked to the version's logged model.
    from xray.registry.store import logged_model_id

    linked = client.get_logged_model(logged_model_id(version)).metrics or []
    assert any(m.key == "site_auc" and m.run_id == summary["mlflow_run_id"] for m in linked)
    # The trainer's run may not change the sealed version: its card and operating points stay as the reviewer left
    # them, the results wait in the site's tag, and a re-fitted point is proposed for the reviewer.
    assert summary["model_card"].startswith("not updated (changing a sealed version needs MANAGE")
    assert "| hospital-b |" not in version.description
    recalibrated_tag = site["recalibrated"]
    if recalibrated_tag["meets_policy"]:
        assert summary["recalibrated"]["operating_point"].startswith("proposed, not stored")
        assert recalibrated_tag["operating_point"]["threshold"] == pytest.approx(summary["recalibrated"]["threshold"])
        applied = team.run(
            "approve",
            "--config",
            str(home / "smoke.yaml"),
            "--model-version",
            "1",
            "--operating-point",
            "hospital-b:" + summary["recalibrated"]["operating_point"].split("--operating-point hospital-b:")[1][:12],
            "--reason",
            "re-fitted on half of hospital b",
            account="reviewer",
        )
        assert applied["action"] == "operating point for site hospital-b applied" and applied["by"] == "reviewer"
    else:
        assert summary["recalibrated"]["operating_point"].startswith("not stored: ")
        refused = team.command(
            "approve",
            "--config",
            str(home / "smoke.yaml"),
            "--model-version",
            "1",
            "--operating-point",
            "hospital-b:0123456789ab",
            "--reason",
            "x",
            account="reviewer",
        )
        assert refused.returncode == 2 and "no proposed operating point for site hospital-b" in refused.stderr
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    card = open(
        mlflow.artifacts.download_artifacts(
            "models:/chest-xray-classifier/1/model_card.md", dst_path=str(tmp_path / "card")
        )
    ).read()
    if recalibrated_tag["meets_policy"]:  # the reviewer's decision brought the card's site results up to date
        assert card.count("## Results by site") == 1
        row = f"| hospital-b | as registered | 47 | {summary['threshold']:.4f} | {summary['metrics']['auc']:.3f} ("
        assert row in card and "| hospital-b | recalibrated on 50% |" in card
        assert "operating point for site hospital-b applied by reviewer" in card
        version = client.get_model_version("chest-xray-classifier", "1")
        assert "## Results by site" in version.description and row in version.description
    training_run = client.get_run(trained[3]["mlflow_run_id"])
    assert training_run.data.tags["model_card"] == "models:/chest-xray-classifier/1/model_card.md"
    assert "model_card.md" not in {a.path for a in client.list_artifacts(trained[3]["mlflow_run_id"])}


def test_the_stack_comes_down_and_up_with_its_runs_and_artifacts(team, trained):
    *_, summary = trained
    keys_before = set(bucket_keys(team))
    pids = {path.stem: int(path.read_text().split()[0]) for path in (team.state / "run").glob("*.pid")}
    from infra.team_stack import TeamStack

    postmaster = TeamStack(state=team.state).postgres.data / "postmaster.pid"
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
    assert (
        team.get(f"{team.info['zenml_url']}/api/v1/runs/{summary['pipeline_run_id']}")["body"]["status"] == "completed"
    )
    # An artifact loaded through the ZenML client from S3, and a model file read through MLflow's artifact proxy.
    # A script file, not `python -c`: without a .zen folder (a fresh clone) ZenML takes its source root from the
    # main module's file.
    script = team.home / "load_metrics.py"
    script.write_text(
        "import json; from zenml.client import Client; "
        f"run = Client().get_pipeline_run('{summary['pipeline_run_id']}'); "
        "print(json.dumps(run.steps['evaluate_model'].outputs['evaluation'][0].load().flat['test_auc']))\n"
    )
    loaded = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=team.env, capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == pytest.approx(summary["metrics"]["test_auc"])
    mlmodel = next(key for key in keys_before if key.startswith("mlflow/") and key.endswith("/MLmodel"))
    artifact = f"{team.info['mlflow_tracking_uri']}/api/2.0/mlflow-artifacts/artifacts/{mlmodel.split('/', 1)[1]}"
    request = urllib.request.Request(artifact, headers=team.auth_headers(artifact))
    with urllib.request.urlopen(request, timeout=30) as response:
        assert b"python_function" in response.read()
    version = mlflow_api(team, f"model-versions/get?name={MODEL}&version={summary['model_version']}")["model_version"]
    assert version["run_id"] == summary["mlflow_run_id"]
