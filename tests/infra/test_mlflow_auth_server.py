"""The team stack's MLflow rule (infra/mlflow_auth.py) on a real `mlflow server --app-name xray-basic-auth` of its own
(SQLite, artifacts proxied to a folder, loopback): every operation on a version's record, through every carrier a
client can put its parameters in, as the trainer (refused, nothing changes) and as the reviewer (done)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from infra.team.mlflow import AUTH_CONFIG, MLFLOW_GRANTS, SERVER_ENV
from support import free_port

pytestmark = pytest.mark.slow
MODEL = "guarded"
PASSWORDS = {"admin": "admin-password-1", "trainer": "trainer-password-1", "reviewer": "reviewer-password-1"}


class Server:
    def __init__(self, url: str, artifacts: Path):
        self.url, self.artifacts = url, artifacts

    def call(self, account: str, method: str, path: str, body=None, query=None, form=None, raw: bytes | None = None):
        """(status, text) of one request as ``account``; ``body`` JSON, ``query`` in the URL, ``form`` urlencoded."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Authorization": "Basic " + base64.b64encode(f"{account}:{PASSWORDS[account]}".encode()).decode()}
        data = raw
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        elif form is not None:
            data, headers["Content-Type"] = urllib.parse.urlencode(form).encode(), "application/x-www-form-urlencoded"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def client(self, account: str):
        from mlflow.tracking import MlflowClient

        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = account, PASSWORDS[account]
        return MlflowClient(self.url)

    def state(self) -> dict:
        """Everything the record holds, read as the admin: aliases, the version's tags and card, the names, the files."""
        client = self.client("admin")
        versions = {
            str(v.version): (dict(v.tags), v.description, sorted(v.aliases))
            for v in client.search_model_versions(f"name='{MODEL}'")
        }
        files = {
            str(p.relative_to(self.artifacts)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.artifacts.rglob("*"))
            if p.is_file()
        }
        names = sorted(m.name for m in client.search_registered_models())
        return {"versions": versions, "files": files, "names": names}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-auth")
    artifacts = folder / "artifacts"
    config = folder / "basic_auth.ini"
    # The team stack's own settings (infra/team/mlflow.py: its credential cache, no job runner), on a SQLite database.
    config.write_text(AUTH_CONFIG.format(database_uri=f"sqlite:///{folder / 'auth.db'}"))
    port = free_port()
    env = (
        os.environ
        | SERVER_ENV
        | {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret",
        }
    )
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    command = [sys.executable, "-m", "mlflow", "server", "--app-name", "xray-basic-auth"]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(artifacts)]
    command += ["--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        from mlflow.server.auth.client import AuthServiceClient

        Server(url, artifacts).client("admin")
        admin = AuthServiceClient(url)
        for user, grants in MLFLOW_GRANTS.items():
            admin.create_user(user, PASSWORDS[user])
            for resource_type, pattern, permission in grants:
                admin.grant_user_permission(user, resource_type, pattern, permission)
        yield Server(url, artifacts)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.update({key: value})
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def registered(server, tmp_path_factory):
    """As the trainer, the way registration does it: v1 (champion, set by the reviewer) and v2 (pending, candidate),
    each a logged model whose folder is completed, then sealed with its digest and its card."""
    import mlflow

    trainer = server.client("trainer")
    mlflow.set_tracking_uri(server.url)
    experiment = trainer.create_experiment("guarded-runs")
    trainer.create_registered_model(MODEL)
    files = tmp_path_factory.mktemp("model")
    (files / "data").mkdir()
    model_ids = []
    for number in ("1", "2"):
        (files / "data" / "model.keras").write_bytes(f"weights {number}".encode())
        logged = trainer.create_logged_model(experiment_id=experiment, name="model")
        model_ids.append(logged.model_id)
        trainer.log_model_artifacts(logged.model_id, str(files))
        version = trainer.create_model_version(MODEL, f"models:/{logged.model_id}", model_id=logged.model_id)
        assert str(version.version) == number
        trainer.log_model_artifacts(logged.model_id, str(files))  # completing the folder before it is sealed
        trainer.set_model_version_tag(MODEL, number, "promotion_decision", "pending_approval")
        trainer.set_model_version_tag(MODEL, number, "approval", "pending")
        trainer.update_model_version(MODEL, number, description=f"# card of v{number}")
        trainer.set_model_version_tag(MODEL, number, "model_sha256", hashlib.sha256(number.encode()).hexdigest())
    trainer.set_registered_model_alias(MODEL, "candidate", "2")
    server.client("reviewer").set_registered_model_alias(MODEL, "champion", "1")
    return {"experiment": experiment, "model_ids": model_ids}


API, AJAX = "/api/2.0/mlflow", "/ajax-api/2.0/mlflow"
# Each operation on the record: (method, path, its parameters); the first is the attack of the security review.
OPERATIONS = {
    "move champion": ("POST", "/registered-models/alias", {"name": MODEL, "alias": "champion", "version": "2"}),
    "remove champion": ("DELETE", "/registered-models/alias", {"name": MODEL, "alias": "champion"}),
    "candidate at a non-pending version": (
        "POST",
        "/registered-models/alias",
        {"name": MODEL, "alias": "candidate", "version": "3"},
    ),
    "remove candidate": ("DELETE", "/registered-models/alias", {"name": MODEL, "alias": "candidate"}),
    "approve": (
        "POST",
        "/model-versions/set-tag",
        {"name": MODEL, "version": "2", "key": "approval", "value": "approved"},
    ),
    "forge history": (
        "POST",
        "/model-versions/set-tag",
        {"name": MODEL, "version": "1", "key": "history.20261206", "value": '{"by": "FORGED by trainer"}'},
    ),
    "rewrite the decision": (
        "POST",
        "/model-versions/set-tag",
        {"name": MODEL, "version": "2", "key": "promotion_decision", "value": "promoted"},
    ),
    "replace the digest": (
        "POST",
        "/model-versions/set-tag",
        {"name": MODEL, "version": "1", "key": "model_sha256", "value": "0" * 64},
    ),
    "remove the decision": (
        "DELETE",
        "/model-versions/delete-tag",
        {"name": MODEL, "version": "2", "key": "promotion_decision"},
    ),
    "rewrite the card": ("PATCH", "/model-versions/update", {"name": MODEL, "version": "1", "description": "FORGED"}),
    "rename": ("POST", "/registered-models/rename", {"name": MODEL, "new_name": "renamed"}),
    "delete a version": ("DELETE", "/model-versions/delete", {"name": MODEL, "version": "1"}),
    "delete the model": ("DELETE", "/registered-models/delete", {"name": MODEL}),
}
HARMLESS = {"alias": "candidate", "key": "site.x", "value": "pending", "version": "2", "name": MODEL}


def carriers(method: str, path: str, params: dict) -> dict:
    """The same request with its parameters where MLflow reads them, elsewhere, and split over two places."""
    benign = {key: HARMLESS.get(key, value) for key, value in params.items()}
    return {
        "body": dict(method=method, path=API + path, body=params),
        "ajax twin": dict(method=method, path=AJAX + path, body=params),
        "query": dict(method=method, path=API + path, query=params, raw=b""),
        "form": dict(method=method, path=API + path, form=params),
        "query hides body": dict(method=method, path=API + path, query=benign, body=params),
        "body hides query": dict(method=method, path=API + path, query=params, body=benign),
    }


def test_every_trainer_request_on_the_record_is_refused_and_changes_nothing(server, registered):
    first = registered["model_ids"][0]
    server.client("admin").create_model_version(MODEL, f"models:/{first}", model_id=first)  # v3: not sealed yet
    before = server.state()
    answers = {}
    # Registration creates each version with its tags in one request: created already decided, it is refused too.
    approved = [{"key": "approval", "value": "approved"}]
    create = {"name": MODEL, "source": f"models:/{first}", "model_id": first, "tags": approved}
    for operation, (method, path, params) in (
        OPERATIONS | {"create approved": ("POST", "/model-versions/create", create)}
    ).items():
        for carrier, request in carriers(method, path, params).items():
            status, text = server.call("trainer", **request)
            answers[operation, carrier] = status
            assert 400 <= status < 500, (operation, carrier, status, text[:300])
    assert server.state() == before
    # The review's exploit answers 403 (the rule), not a parse error: the reading is MLflow's own.
    assert answers["move champion", "body"] == 403 and answers["move champion", "query hides body"] == 400
    assert answers["create approved", "body"] == answers["create approved", "ajax twin"] == 403
    status, text = server.call("trainer", **carriers(*OPERATIONS["approve"])["body"])
    assert status == 403 and "needs MANAGE" in text and "user 'trainer'" in text
    # Its own promotion lock is the trainer's to delete, never to rename onto a model it would then manage.
    trainer = server.client("trainer")
    trainer.create_registered_model("fresh.promotion-lock")
    rename = {"name": "fresh.promotion-lock", "new_name": "fresh"}
    assert server.call("trainer", "POST", API + "/registered-models/rename", body=rename)[0] == 403
    trainer.delete_registered_model("fresh.promotion-lock")
    assert server.state() == before


def test_the_trainer_cannot_overwrite_the_files_of_a_sealed_version(server, registered):
    before = server.state()
    experiment, model_id = registered["experiment"], registered["model_ids"][-1]
    target = f"{experiment}/models/{model_id}/artifacts/data/model.keras"
    attempts = {
        "upload": ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{target}"),
        "upload (ajax)": ("PUT", f"/ajax-api/2.0/mlflow-artifacts/artifacts/{target}"),
        "upload (encoded)": ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{target.replace('/', '%2F')}"),
        "delete": ("DELETE", f"/api/2.0/mlflow-artifacts/artifacts/{target}"),
        "delete the folder above": ("DELETE", f"/api/2.0/mlflow-artifacts/artifacts/{experiment}/models"),
        "multipart": ("POST", f"/api/2.0/mlflow-artifacts/mpu/create/{target}"),
    }
    for what, (method, path) in attempts.items():
        status, text = server.call("trainer", method, path, raw=b"FORGED by trainer")
        assert 400 <= status < 500, (what, status, text[:300])
    status, _ = server.call(
        "trainer", "POST", "/api/2.0/mlflow/artifacts/presigned-upload-url", body={"model_id": model_id, "path": "x"}
    )
    assert status == 403
    status, _ = server.call("trainer", "DELETE", f"/api/2.0/mlflow/logged-models/{model_id}")
    assert status == 403
    assert server.state() == before
    # A run's own artifacts stay the trainer's to write.
    trainer = server.client("trainer")
    run = trainer.create_run(registered["experiment"])
    status, _ = server.call(
        "trainer",
        "PUT",
        f"/api/2.0/mlflow-artifacts/artifacts/{experiment}/{run.info.run_id}/artifacts/plot.txt",
        raw=b"ok",
    )
    assert status == 200


def test_the_reviews_bypasses_stay_closed(server, registered):
    """The security probe of this rule (each once a way in): an upload whose credentials MLflow and the rule would read
    differently, a '.' in the path, a double-encoded create that kept its creator MANAGE, decision tags carried by a
    new version, a digest added to a sealed version, the UI's upload route into a run that holds a version."""
    import http.client

    before = server.state()
    experiment, model_id = registered["experiment"], registered["model_ids"][-1]
    target = f"/api/2.0/mlflow-artifacts/artifacts/{experiment}/models/{model_id}/artifacts/data/model.keras"
    trainer = "Basic " + base64.b64encode(f"trainer:{PASSWORDS['trainer']}".encode()).decode()
    host, port = server.url.removeprefix("http://").split(":")
    for headers in ([trainer, "Basic eDp5"], [trainer.replace(" ", "\t")]):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.putrequest("PUT", target)
        for value in headers:
            connection.putheader("Authorization", value)
        connection.putheader("Content-Length", "6")
        connection.endheaders(b"FORGED")
        status = connection.getresponse().status
        connection.close()
        assert 400 <= status < 500, (headers, status)
    dotted = target.replace(f"/{experiment}/models/", f"/{experiment}/./models/")
    assert server.call("trainer", "PUT", dotted, raw=b"FORGED")[0] == 400
    assert server.state() == before

    status, _ = server.call(
        "trainer",
        "POST",
        API + "/registered-models/create",
        raw=json.dumps(json.dumps({"name": "fresh-model"})).encode(),
    )
    moved = {"name": "fresh-model", "alias": "champion", "version": "1"}
    if status == 200:  # created: its creator holds EDIT on it, never MANAGE
        assert server.call("trainer", "POST", API + "/registered-models/alias", body=moved)[0] == 403
    forged = {"name": MODEL, "source": f"models:/{model_id}", "model_id": model_id}
    for tag in ({"key": "approval", "value": "approved"}, {"key": "history.1", "value": '{"by": "reviewer"}'}):
        status, text = server.call("trainer", "POST", API + "/model-versions/create", body=forged | {"tags": [tag]})
        assert status == 403, (tag, text[:200])
    champion_without_digest = {"name": MODEL, "version": "1", "key": "card_sha256", "value": "0" * 64}
    assert server.call("trainer", "POST", API + "/model-versions/set-tag", body=champion_without_digest)[0] == 403

    run = server.client("trainer").create_run(experiment)
    legacy = server.client("admin").create_model_version(
        MODEL, f"mlflow-artifacts:/{experiment}/{run.info.run_id}/artifacts/model", run_id=run.info.run_id
    )
    server.client("reviewer").set_registered_model_alias(MODEL, "legacy", legacy.version)  # an alias seals it
    query = {"run_uuid": run.info.run_id, "path": "model/data/model.keras"}
    assert server.call("trainer", "POST", "/ajax-api/2.0/mlflow/upload-artifact", query=query, raw=b"FORGED")[0] == 403


def test_the_reviewer_does_each_of_them(server, registered):
    reviewer = "reviewer"
    done = [
        ("POST", "/registered-models/alias", {"name": MODEL, "alias": "champion", "version": "2"}),
        ("POST", "/model-versions/set-tag", {"name": MODEL, "version": "2", "key": "approval", "value": "approved"}),
        ("POST", "/model-versions/set-tag", {"name": MODEL, "version": "2", "key": "history.1", "value": "{}"}),
        ("DELETE", "/registered-models/alias", {"name": MODEL, "alias": "candidate"}),
        ("DELETE", "/model-versions/delete-tag", {"name": MODEL, "version": "1", "key": "promotion_decision"}),
        ("PATCH", "/model-versions/update", {"name": MODEL, "version": "1", "description": "# card, reviewed"}),
    ]
    for index, (method, path, params) in enumerate(done):
        prefix = AJAX if index % 2 else API
        status, text = server.call(reviewer, method, prefix + path, body=params)
        assert status == 200, (path, text[:300])
    model_id = registered["model_ids"][-1]
    target = f"{registered['experiment']}/models/{model_id}/artifacts/data/operating_points.json"
    assert server.call(reviewer, "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{target}", raw=b"{}")[0] == 200
    client = server.client("admin")
    version = client.get_model_version(MODEL, "2")
    assert version.tags["approval"] == "approved" and "champion" in version.aliases
    assert client.get_model_version(MODEL, "1").description == "# card, reviewed"
    status, _ = server.call(reviewer, "POST", API + "/registered-models/rename", body={"name": MODEL, "new_name": "m2"})
    assert status == 200
    assert server.call(reviewer, "DELETE", API + "/registered-models/delete", body={"name": "m2"})[0] == 200
