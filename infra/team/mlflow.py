"""The team stack's MLflow tracking server: runs, registry and users in PostgreSQL (:mod:`infra.team.postgres`),
artifacts proxied to S3, the xray-basic-auth app (infra/mlflow_auth.py); and its accounts, which `up` sets up as
MLflow's admin: `trainer` and `reviewer` with MLFLOW_GRANTS."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.team.credentials import Credentials
from infra.team.postgres import Postgres
from infra.team.processes import Processes, TeamStackError
from infra.team.s3 import S3

# What each MLflow account may do, beyond the basic-auth default (READ): (resource type, pattern, permission).
MLFLOW_GRANTS = {
    "trainer": [("experiment", "*", "EDIT"), ("registered_model", "*", "EDIT")],
    "reviewer": [("experiment", "*", "EDIT"), ("registered_model", "*", "MANAGE")],
}
# basic-auth's settings; no password in the file (the admin's comes from the environment). A password check (PBKDF2)
# costs a worker about a third of a second on two cores, per request: cached for a minute per worker, so a changed
# password may still work on another worker for up to 60 s.
AUTH_CONFIG = """[mlflow]
default_permission = READ
database_uri = {database_uri}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
"""
# The server's own settings. No job runner: MLflow 3 starts seven Huey consumer processes (each a Python that imports
# MLflow, about 3 s of CPU and 150 MB) for its server-side jobs (GenAI scorers, trace roll-ups), which this project
# never submits.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass
class MLflowServer:
    processes: Processes
    credentials: Credentials
    postgres: Postgres
    s3: S3
    port: int = 5050

    @property
    def url(self) -> str:
        return self.processes.url(self.port)

    @property
    def health_url(self) -> str:
        return self.url + "/health"

    def start(self) -> str:
        if self.processes.running("mlflow", self.health_url):
            return "running"
        self.processes.port_free("mlflow", self.port)
        mlflow = Path(sys.executable).parent / "mlflow"
        command = [str(mlflow), "server", "--app-name", "xray-basic-auth"]
        command += ["--backend-store-uri", self.postgres.backend_store_uri()]
        command += ["--artifacts-destination", self.s3.mlflow_root, "--serve-artifacts"]
        command += ["--host", self.processes.host, "--port", str(self.port), "--workers", "2"]
        env = SERVER_ENV | self.s3.env() | self._auth_env() | self.postgres.server_env()
        pid = self.processes.spawn("mlflow", command, env)
        self.processes.wait_healthy("mlflow", self.health_url, pid)
        return "started"

    def _auth_env(self) -> dict[str, str]:
        """The basic-auth app's settings file (written here) and its secrets, for the server's environment."""
        auth_config = self.processes.state / "mlflow" / "basic_auth.ini"
        auth_config.parent.mkdir(parents=True, exist_ok=True)
        auth_config.write_text(AUTH_CONFIG.format(database_uri=self.postgres.backend_store_uri("mlflow_auth")))
        credentials = self.credentials.read()
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": credentials["mlflow_admin_password"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": credentials["mlflow_secret_key"],
        }

    def ensure_accounts(self) -> None:
        """As MLflow's admin: the trainer and the reviewer exist, with the current passwords and MLFLOW_GRANTS."""
        from mlflow.exceptions import MlflowException
        from mlflow.server.auth.client import AuthServiceClient

        with scoped_environment(self.credentials.mlflow_account("admin")):
            admin = AuthServiceClient(self.url)
            for user, grants in MLFLOW_GRANTS.items():
                password = self.credentials.read()[f"mlflow_{user}_password"]
                try:
                    admin.get_user(user)
                    admin.update_user_password(user, password)
                except MlflowException as error:
                    if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise TeamStackError(f"MLflow refused its admin account: {str(error)[:300]}") from None
                    admin.create_user(user, password)
                for resource_type, pattern, permission in grants:
                    try:
                        admin.grant_user_permission(user, resource_type, pattern, permission)
                    except MlflowException as error:  # granted by an earlier `up`: set it again as MLFLOW_GRANTS says
                        if error.error_code != "RESOURCE_ALREADY_EXISTS":
                            raise
                        admin.revoke_user_permission(user, resource_type, pattern)
                        admin.grant_user_permission(user, resource_type, pattern, permission)


@contextmanager
def scoped_environment(values: dict[str, str]):
    """``values`` in os.environ for the block (MLflow's clients read their credentials there), then as before."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
