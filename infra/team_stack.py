"""The team stack on one machine: a ZenML server, an MLflow tracking server on PostgreSQL, an S3 endpoint that
keeps its objects on disk, and the ZenML stack `team` that uses them.

    python -m infra.team_stack up      # start what is not running, connect the zenml client, register `team`
    python -m infra.team_stack down    # disconnect the client (back to the local store), stop every process
    python -m infra.team_stack status  # one JSON line: services, URLs, pids

`make team-stack` / `make team-stack-down` call these. Everything lives under the state folder (`.team/` by
default): the S3 objects, the PostgreSQL cluster, the ZenML server's database, logs and pid files. `down` keeps
it, so the next `up` finds every run, model and artifact again. Ports come from flags or XRAY_TEAM_* variables.

Parts (docs/OPERATIONS.md "Team stack"):
  s3rver (npm, objects as files under state/s3)                         http://127.0.0.1:S3_PORT
  PostgreSQL (initdb into state/postgres, password auth; SQLite with a notice if absent)  127.0.0.1:PG_PORT
  mlflow server --app-name xray-basic-auth (infra/mlflow_auth.py), runs and users in PostgreSQL, artifacts in S3
  ZenML server (uvicorn, OAuth2 password login, SQLite under state/zenml, dashboard at /)  http://127.0.0.1:ZENML_PORT

Accounts (passwords from XRAY_TEAM_* variables, else generated once into state/credentials.json, mode 0600):
  ZenML `default` (the client logs in with it); MLflow `admin` (sets up the others), `trainer` (EDIT: runs,
  versions, the candidate alias; the stack's tracker uses it) and `reviewer` (MANAGE on every registered model:
  approve, reject, roll back); PostgreSQL `mlflow`. S3 (s3rver) checks no keys: it listens on loopback only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from xray.environment import REPO_ROOT

ROOT = REPO_ROOT
S3RVER_VERSION = "3.7.1"
S3RVER_HOME = ROOT / ".cache" / f"s3rver-{S3RVER_VERSION}"
# s3rver's built-in credentials: it verifies none, so the endpoint only listens on 127.0.0.1 (docs/OPERATIONS.md).
S3_KEY = S3_SECRET = "S3RVER"
ZENML_USER = "default"
# Each password: its environment variable, else generated once into state/credentials.json.
PASSWORDS = {
    "postgres_password": "XRAY_TEAM_PG_PASSWORD",
    "zenml_password": "XRAY_TEAM_ZENML_PASSWORD",
    "mlflow_admin_password": "XRAY_TEAM_MLFLOW_ADMIN_PASSWORD",
    "mlflow_trainer_password": "XRAY_TEAM_MLFLOW_TRAINER_PASSWORD",
    "mlflow_reviewer_password": "XRAY_TEAM_MLFLOW_REVIEWER_PASSWORD",
    "mlflow_secret_key": "XRAY_TEAM_MLFLOW_SECRET_KEY",
    "zenml_jwt_secret_key": "XRAY_TEAM_ZENML_JWT_SECRET_KEY",  # signs ZenML's sessions: they outlive a restart
}
# What each MLflow account may do, beyond the basic-auth default (READ): (resource type, pattern, permission).
MLFLOW_GRANTS = {
    "trainer": [("experiment", "*", "EDIT"), ("registered_model", "*", "EDIT")],
    "reviewer": [("experiment", "*", "EDIT"), ("registered_model", "*", "MANAGE")],
}
REGION = "us-east-1"
STACK = "team"
logger = logging.getLogger("team_stack")


class TeamStackError(RuntimeError):
    pass


@dataclass
class TeamStack:
    state: Path = ROOT / ".team"
    host: str = "127.0.0.1"
    zenml_port: int = 8237
    mlflow_port: int = 5050
    s3_port: int = 9010
    pg_port: int = 5433
    bucket: str = "xray-team"
    timeout_s: float = 120.0
    notices: list[str] = field(default_factory=list)
    _credentials: dict[str, str] = field(default_factory=dict, repr=False)  # read (or made) once per process
    _zenml_token: str = field(default="", repr=False)

    # -- addresses --
    @property
    def zenml_url(self) -> str:
        return f"http://{self.host}:{self.zenml_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def s3_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def artifact_root(self) -> str:
        """Where ZenML writes artifacts; MLflow's go under s3://BUCKET/mlflow."""
        return f"s3://{self.bucket}/zenml"

    def s3_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
        }

    def s3_client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name=REGION,
        )

    # -- processes --
    def _pid_file(self, name: str) -> Path:
        return self.state / "run" / f"{name}.pid"

    def _log(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def _pid(self, name: str) -> int | None:
        path = self._pid_file(name)
        if not path.is_file():
            return None
        pid = int(path.read_text().split()[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        try:  # a zombie (exited, its parent has not reaped it yet) is not running
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return None
        except (OSError, IndexError):
            pass
        return pid

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> int:
        self._log(name).parent.mkdir(parents=True, exist_ok=True)
        self._pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        with open(self._log(name), "ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=os.environ | (env or {}),
                start_new_session=True,
                cwd=self.state,
                umask=0o077,  # what a service writes (ZenML's database, its secrets) is its owner's only
            )
        self._pid_file(name).write_text(f"{process.pid}\n")
        return process.pid

    def _wait_healthy(self, name: str, url: str, pid: int | None = None) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if healthy(url, timeout_s=10):  # a loaded machine answers late, not never
                return
            if pid is not None and self._pid(name) is None:
                raise TeamStackError(
                    f"{name} exited while starting; last lines of {self._log(name)}:\n" + tail(self._log(name))
                )
            time.sleep(0.5)
        raise TeamStackError(
            f"{name} not healthy at {url} after {self.timeout_s:.0f} s; see {self._log(name)}:\n"
            + tail(self._log(name))
        )

    def _running(self, name: str, url: str) -> bool:
        """Whether our ``name`` runs: a live process from our pid file is awaited until it answers, never started twice
        (a busy machine can keep a health check waiting longer than its timeout)."""
        pid = self._pid(name)
        if pid is None:
            return False
        self._wait_healthy(name, url, pid)
        return True

    def _port_free(self, name: str, port: int) -> None:
        with socket.socket() as probe:
            if probe.connect_ex((self.host, port)) == 0:
                raise TeamStackError(
                    f"{name}: port {port} on {self.host} is taken by a process this stack did not start; "
                    f"stop it or choose another port (--{name}-port)"
                )

    def _stop(self, name: str) -> bool:
        pid = self._pid(name)
        if pid is None:
            self._pid_file(name).unlink(missing_ok=True)
            return False
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._pid(name) is not None:
            time.sleep(0.2)
        if self._pid(name) is not None:
            logger.warning("%s (pid %d) did not stop on SIGTERM; killing it", name, pid)
            os.killpg(pid, signal.SIGKILL)
        self._pid_file(name).unlink(missing_ok=True)
        return True

    # -- S3: s3rver keeps every object as files under state/s3 --
    def start_s3(self) -> str:
        if self._running("s3", self.s3_url + f"/{self.bucket}"):
            return "running"
        self._port_free("s3", self.s3_port)
        binary = s3rver_binary()
        data = self.state / "s3"
        data.mkdir(parents=True, exist_ok=True)
        # s3rver makes ListObjectsV2 continuation tokens with DES, which Node's OpenSSL 3 only has in its legacy
        # provider: without it every truncated listing (s3fs asks for MaxKeys=1 to test a prefix) is a 500.
        node_options = " ".join(filter(None, [os.environ.get("NODE_OPTIONS"), "--openssl-legacy-provider"]))
        pid = self._spawn(
            "s3",
            [
                str(binary),
                "--directory",
                str(data),
                "--address",
                self.host,
                "--port",
                str(self.s3_port),
                "--configure-bucket",
                self.bucket,
            ],
            {"NODE_OPTIONS": node_options},
        )
        self._wait_healthy("s3", self.s3_url + f"/{self.bucket}", pid)
        return "started"

    # -- credentials: from the environment, else generated once into state/credentials.json (mode 0600) --
    @property
    def credentials_file(self) -> Path:
        return self.state / "credentials.json"

    def credentials(self) -> dict[str, str]:
        """Every service password the stack uses; never logged, never in info() or a status line."""
        if self._credentials:
            return self._credentials
        stored = json.loads(self.credentials_file.read_text()) if self.credentials_file.is_file() else {}
        wanted = {key: os.environ.get(variable) for key, variable in PASSWORDS.items()}
        missing = {k for k, v in wanted.items() if not v and k not in stored}
        if missing:
            stored |= {k: secrets.token_urlsafe(24) for k in missing}
            self.state.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                json.dump(stored, handle)
            os.chmod(self.credentials_file, 0o600)
            logger.info("generated the team stack's passwords into %s (readable by you only)", self.credentials_file)
        self._credentials = stored | {k: v for k, v in wanted.items() if v}
        return self._credentials

    def mlflow_account(self, user: str) -> dict[str, str]:
        """MLflow's client reads its credentials from these variables (the stack's tracker sets the trainer's)."""
        return {
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self.credentials()[f"mlflow_{user}_password"],
        }

    def pg_env(self) -> dict[str, str]:
        """What PostgreSQL's clients (psql, MLflow's psycopg2) read the password from: never a command line or URI."""
        return {"PGPASSWORD": self.credentials()["postgres_password"]}

    # -- PostgreSQL for MLflow's backend store: password (SCRAM) authentication, loopback only --
    def backend_store_uri(self, database: str = "mlflow") -> str:
        """MLflow's runs and registry (``mlflow``) or its basic-auth users and grants (``mlflow_auth``)."""
        if postgres_bin() is None:
            return f"sqlite:///{self.state / 'mlflow' / (database + '.db')}"
        return f"postgresql://mlflow@{self.host}:{self.pg_port}/{database}"

    @property
    def pg_home(self) -> Path:
        """Where PostgreSQL keeps its cluster: the state folder, except as root, where PostgreSQL runs as `postgres`,
        which must not reach into the state folder (0700, it holds the passwords): then a folder of its own under
        `postgres`'s home, named after the state folder."""
        if os.geteuid() != 0:
            return self.state
        import pwd

        try:
            home = Path(pwd.getpwnam("postgres").pw_dir or "/var/lib/postgresql")
        except KeyError:
            return self.state
        return home / "xray-team" / hashlib.sha256(str(self.state.resolve()).encode()).hexdigest()[:16]

    @property
    def pg_data(self) -> Path:
        return self.state / "postgres" if self.pg_home == self.state else self.pg_home / "data"

    @property
    def pg_sockets(self) -> Path:
        return self.state / "run" / "pg" if self.pg_home == self.state else self.pg_home / "sockets"

    def _move_postgres_out_of_state(self, bin_dir: Path, as_user: PostgresUser) -> None:
        """A cluster an earlier version made inside the state folder as root moves to :attr:`pg_data` (stopped
        first), so that the state folder can be 0700."""
        old = self.state / "postgres"
        if old == self.pg_data or not (old / "PG_VERSION").is_file() or (self.pg_data / "PG_VERSION").is_file():
            if self.pg_home != self.state:
                self._make_pg_home(as_user)
            return
        if (old / "postmaster.pid").is_file():
            run([*as_user.prefix, str(bin_dir / "pg_ctl"), "-D", str(old), "-m", "fast", "-w", "stop"], "pg_ctl stop")
        self._make_pg_home(as_user)
        shutil.move(str(old), str(self.pg_data))
        logger.info("moved PostgreSQL's cluster from %s to %s (the state folder is now 0700)", old, self.pg_data)

    def _make_pg_home(self, as_user: PostgresUser) -> None:
        for folder in (self.pg_home.parent, self.pg_home):
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir(exist_ok=True, mode=0o700)
            folder.chmod(0o700)
            as_user.chown(folder)

    SECRET_PATHS = ("credentials.json", "zenml", "mlflow", "logs", "run")
    """Under the state folder: what holds a secret (the passwords, ZenML's database with the tracker's secret,
    MLflow's SQLite users when PostgreSQL is absent) or may (logs)."""

    def secure_state(self, report: bool = True) -> list[str]:
        """The state folder 0700, and every file of :attr:`SECRET_PATHS` 0600 (their folders 0700); a wider mode is
        narrowed and reported in one line. Returns what was narrowed."""
        narrowed = []

        def narrow(path: Path, mode: int) -> None:
            current = stat.S_IMODE(path.lstat().st_mode)
            if current & ~mode and not path.is_symlink() and path.owner() == self.state.owner():
                path.chmod(current & mode)
                narrowed.append(f"{path.relative_to(self.state.parent)} {current:04o} -> {current & mode:04o}")

        self.state.mkdir(parents=True, exist_ok=True)
        narrow(self.state, 0o700)
        for name in self.SECRET_PATHS:
            top = self.state / name
            for path in [top, *top.rglob("*")] if top.is_dir() else [top] if top.exists() else []:
                if path != self.pg_sockets and self.pg_sockets not in path.parents:
                    narrow(path, 0o700 if path.is_dir() else 0o600)
        if narrowed and report:
            logger.warning("secured the team stack's state folder: %s", "; ".join(narrowed))
        return narrowed

    def start_postgres(self) -> str:
        bin_dir = postgres_bin()
        if bin_dir is None:
            notice = (
                "PostgreSQL not found (no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on PATH): "
                "the MLflow server uses SQLite under " + str(self.state / "mlflow")
            )
            self.notices.append(notice)
            logger.warning(notice)
            (self.state / "mlflow").mkdir(parents=True, exist_ok=True)
            return "absent (SQLite)"
        data, sockets = self.pg_data, self.pg_sockets
        as_user = as_postgres_user(data, sockets)
        self._move_postgres_out_of_state(bin_dir, as_user)
        status = "running"
        if not (data / "PG_VERSION").is_file():
            data.mkdir(parents=True, exist_ok=True)
            as_user.chown(data)
            password_file = sockets.parent / "pg-password"  # where `postgres` can read it
            password_file.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(self.credentials()["postgres_password"] + "\n")
            as_user.chown(password_file)
            try:
                run(
                    [
                        *as_user.prefix,
                        str(bin_dir / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        "mlflow",
                        "--auth=scram-sha-256",
                        f"--pwfile={password_file}",
                        "-E",
                        "UTF8",
                    ],
                    "initdb",
                )
            finally:
                password_file.unlink(missing_ok=True)
        sockets.mkdir(parents=True, exist_ok=True)
        as_user.chown(sockets)
        probe = subprocess.run(
            [*as_user.prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "status"], capture_output=True, text=True
        )
        if probe.returncode != 0:
            options = f"-p {self.pg_port} -k {sockets} -c listen_addresses={self.host}"
            run(
                [
                    *as_user.prefix,
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-o",
                    options,
                    "-l",
                    str(data / "server.log"),
                    "-w",
                    "-t",
                    str(int(self.timeout_s)),
                    "start",
                ],
                "pg_ctl start",
            )
            status = "started"
        self._require_passwords(bin_dir, data, as_user)
        exists = subprocess.run(
            [str(bin_dir / "psql"), "-h", self.host, "-p", str(self.pg_port), "-U", "mlflow", "-d", "postgres"]
            + ["-tAc", "SELECT datname FROM pg_database"],
            capture_output=True,
            text=True,
            env=os.environ | self.pg_env(),
        )
        if exists.returncode != 0:
            raise TeamStackError(f"PostgreSQL on port {self.pg_port} does not answer: {exists.stderr.strip()}")
        for database in {"mlflow", "mlflow_auth"} - set(exists.stdout.split()):
            run(
                [str(bin_dir / "createdb"), "-h", self.host, "-p", str(self.pg_port), "-U", "mlflow", database],
                "createdb",
                self.pg_env(),
            )
        return status

    def _require_passwords(self, bin_dir: Path, data: Path, as_user: PostgresUser) -> None:
        """A cluster made by an earlier version of this stack trusts every local connection: give `mlflow` its
        password (over the cluster's own socket, the statement on stdin) and switch pg_hba.conf to SCRAM."""
        hba = data / "pg_hba.conf"
        rules = [line for line in hba.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not any(line.split()[-1] == "trust" for line in rules):
            return
        password = self.credentials()["postgres_password"].replace("'", "''")
        result = subprocess.run(
            [*as_user.prefix, str(bin_dir / "psql"), "-h", str(self.pg_sockets), "-p", str(self.pg_port)]
            + ["-U", "mlflow", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-f", "-"],
            input=f"ALTER USER mlflow PASSWORD '{password}';\n",
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise TeamStackError(f"setting the PostgreSQL password failed: {result.stderr.strip()[-500:]}")
        text = "\n".join(
            line.rsplit("trust", 1)[0] + "scram-sha-256" if line.rstrip().endswith("trust") else line
            for line in hba.read_text().splitlines()
        )
        hba.write_text(text + "\n")
        run([*as_user.prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "reload"], "pg_ctl reload")
        logger.info("PostgreSQL now asks for a password (it trusted local connections before)")

    def stop_postgres(self) -> bool:
        bin_dir = postgres_bin()
        data = self.pg_data
        if bin_dir is None or not (data / "postmaster.pid").is_file():
            return False
        as_user = as_postgres_user(data, self.pg_sockets)
        run([*as_user.prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], "pg_ctl stop")
        return True

    # -- MLflow tracking server: runs, registry and users in PostgreSQL, artifacts proxied to S3, basic-auth --
    def start_mlflow(self) -> str:
        if self._running("mlflow", self.mlflow_url + "/health"):
            return "running"
        self._port_free("mlflow", self.mlflow_port)
        mlflow = Path(sys.executable).parent / "mlflow"
        # basic-auth's settings; no password in the file (the admin's comes from the environment).
        auth_config = self.state / "mlflow" / "basic_auth.ini"
        auth_config.parent.mkdir(parents=True, exist_ok=True)
        auth_config.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {self.backend_store_uri('mlflow_auth')}\nadmin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # A password check (PBKDF2) costs a worker about a third of a second on two cores, per request: cached
            # for a minute per worker, so a changed password may still work on another worker for up to 60 s.
            "auth_cache_ttl_seconds = 60\n"
        )
        credentials = self.credentials()
        auth_env = {
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": credentials["mlflow_admin_password"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": credentials["mlflow_secret_key"],
        }
        pid = self._spawn(
            "mlflow",
            [
                str(mlflow),
                "server",
                "--app-name",
                "xray-basic-auth",
                "--backend-store-uri",
                self.backend_store_uri(),
                "--artifacts-destination",
                f"s3://{self.bucket}/mlflow",
                "--serve-artifacts",
                "--host",
                self.host,
                "--port",
                str(self.mlflow_port),
                "--workers",
                "2",
            ],
            self.s3_env() | auth_env | (self.pg_env() if postgres_bin() is not None else {}),
        )
        self._wait_healthy("mlflow", self.mlflow_url + "/health", pid)
        return "started"

    def ensure_mlflow_accounts(self) -> None:
        """As MLflow's admin: the trainer and the reviewer exist, with the current passwords and MLFLOW_GRANTS."""
        from mlflow.exceptions import MlflowException
        from mlflow.server.auth.client import AuthServiceClient

        with scoped_environment(self.mlflow_account("admin")):
            admin = AuthServiceClient(self.mlflow_url)
            for user, grants in MLFLOW_GRANTS.items():
                password = self.credentials()[f"mlflow_{user}_password"]
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

    # -- ZenML server: its own config folder and SQLite database under state/zenml --
    def start_zenml(self, wait: bool = True) -> str:
        """Start the ZenML server; with ``wait=False`` return once it is spawned (:meth:`up` awaits it last)."""
        if self._running("zenml", self.zenml_url + "/health"):
            return "running"
        self._port_free("zenml", self.zenml_port)
        home = self.state / "zenml"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            "ZENML_SERVER": "true",
            "ZENML_CONFIG_PATH": str(home / "config"),
            "ZENML_STORE_URL": f"sqlite:///{home / 'zenml.db'}",
            "ZENML_SERVER_AUTH_SCHEME": "OAUTH2_PASSWORD_BEARER",
            "ZENML_DEFAULT_USER_NAME": ZENML_USER,
            "ZENML_DEFAULT_USER_PASSWORD": self.credentials()["zenml_password"],
            "ZENML_SERVER_JWT_SECRET_KEY": self.credentials()["zenml_jwt_secret_key"],
            "ZENML_SERVER_DEPLOYMENT_TYPE": "local",
            "ZENML_SERVER_AUTO_ACTIVATE": "True",
            "ZENML_SERVER_ALLOW_LOCAL_FILE_ACCESS": "true",
            "ZENML_ANALYTICS_OPT_IN": "false",
        } | self.s3_env()
        pid = self._spawn(
            "zenml",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "zenml.zen_server.zen_server_api:app",
                "--host",
                self.host,
                "--port",
                str(self.zenml_port),
                "--log-level",
                "warning",
            ],
            env,
        )
        if wait:
            self._wait_healthy("zenml", self.zenml_url + "/health", pid)
        return "started"

    # -- the zenml client and the stack --
    def connect_client(self) -> None:
        """What `zenml login --username --password` does: the global config's store becomes the server, and the
        password goes into ZenML's credentials store (the user's config folder), from which the client logs in."""
        from zenml.config.global_config import GlobalConfiguration
        from zenml.login.credentials_store import get_credentials_store
        from zenml.zen_stores.rest_zen_store import RestZenStoreConfiguration

        self.zenml_token()  # the password is right (set on an older server first)
        password = self.credentials()["zenml_password"]
        credentials = get_credentials_store()
        credentials.set_password(self.zenml_url, ZENML_USER, password)
        os.chmod(credentials._credentials_file, 0o600)  # ZenML writes it 0644; it holds the password now
        config = GlobalConfiguration()
        if config.store_configuration.url != self.zenml_url:
            config.set_store(RestZenStoreConfiguration(url=self.zenml_url))

    def zenml_token(self) -> str:
        """A bearer token for the ZenML server's REST API. A server started by an older stack (NO_AUTH) has the user
        `default` with an empty password: it gets the generated one first."""
        if self._zenml_token:
            return self._zenml_token
        password = self.credentials()["zenml_password"]
        token = zenml_login(self.zenml_url, ZENML_USER, password)
        if token is not None:
            self._zenml_token = token
            return token
        old = zenml_login(self.zenml_url, ZENML_USER, "")
        if old is None:
            raise TeamStackError(
                f"the ZenML server refuses user '{ZENML_USER}' with the password in {self.credentials_file} "
                "(or XRAY_TEAM_ZENML_PASSWORD)"
            )
        body = {"password": password, "old_password": ""}
        zenml_request(self.zenml_url, "/api/v1/current-user", old, body, "PUT")
        logger.info("the ZenML server now asks for a password (it had none before)")
        self._zenml_token = zenml_login(self.zenml_url, ZENML_USER, password)
        return self._zenml_token

    def register_stack(self) -> str:
        from zenml.client import Client
        from zenml.enums import StackComponentType as Kind

        client = Client()
        self.skip_onboarding()
        tracker_secret = f"{STACK}-mlflow"
        # The tracker logs in to MLflow as the trainer: it registers versions and never moves `champion`.
        values = {"username": "trainer", "password": self.credentials()["mlflow_trainer_password"]}
        if client.list_secrets(name=tracker_secret).items:
            client.update_secret(tracker_secret, add_or_update_values=values)
        else:
            client.create_secret(tracker_secret, values=values)
        if any(s.name == STACK for s in client.list_stacks(name=STACK)):
            return "registered"
        secret = f"{STACK}-s3"
        if not client.list_secrets(name=secret).items:
            client.create_secret(secret, values={"key": S3_KEY, "secret": S3_SECRET})
        client.create_stack_component(
            f"{STACK}-s3",
            "s3",
            Kind.ARTIFACT_STORE,
            {
                "path": self.artifact_root,
                "key": f"{{{{{secret}.key}}}}",
                "secret": f"{{{{{secret}.secret}}}}",
                "client_kwargs": {"endpoint_url": self.s3_url, "region_name": REGION},
            },
        )
        client.create_stack_component(
            f"{STACK}-mlflow",
            "mlflow",
            Kind.EXPERIMENT_TRACKER,
            {
                "tracking_uri": self.mlflow_url,
                "tracking_username": f"{{{{{tracker_secret}.username}}}}",
                "tracking_password": f"{{{{{tracker_secret}.password}}}}",
            },
        )
        client.create_stack_component(f"{STACK}-mlflow-registry", "mlflow", Kind.MODEL_REGISTRY, {})
        client.create_stack(
            STACK,
            components={
                Kind.ORCHESTRATOR: "default",
                Kind.ARTIFACT_STORE: f"{STACK}-s3",
                Kind.EXPERIMENT_TRACKER: f"{STACK}-mlflow",
                Kind.MODEL_REGISTRY: f"{STACK}-mlflow-registry",
            },
        )
        return "created"

    def skip_onboarding(self) -> None:
        """The dashboard's first-run form (account details, survey) is shown while the user's email_opted_in is
        unset and the survey unfinished; answer both for the server's user. Only PUT /current-user may set
        email_opted_in (the users endpoint drops it)."""
        body = {
            "email_opted_in": False,
            "user_metadata": {"finished_onboarding_survey": True, "awareness_channels": ["team-stack"]},
        }
        user = zenml_request(self.zenml_url, "/api/v1/current-user", self.zenml_token(), body, "PUT")
        if user["body"]["email_opted_in"] is not False:
            raise TeamStackError("the ZenML server did not record the dashboard's onboarding answers")

    def disconnect_client(self) -> bool:
        from zenml.config.global_config import GlobalConfiguration

        config = GlobalConfiguration()
        if config.store_configuration.url != self.zenml_url:
            return False
        config.set_default_store()
        return True

    # -- the commands --
    def up(self) -> dict:
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        narrowed = self.secure_state(report=False)
        # The ZenML server is the slowest to come up (its database migrations) and needs none of the others: it starts
        # first and is awaited last, while S3, PostgreSQL and MLflow start in turn.
        zenml = self.start_zenml(wait=False)
        services = {"s3": self.start_s3(), "postgres": self.start_postgres(), "mlflow": self.start_mlflow()}
        self.ensure_mlflow_accounts()
        if zenml == "started":
            self._wait_healthy("zenml", self.zenml_url + "/health", self._pid("zenml"))
        services["zenml"] = zenml
        self.connect_client()
        services["stack"] = self.register_stack()
        narrowed += self.secure_state(report=False)  # what the services made before their umask applied (an old one)
        if narrowed:
            logger.warning("secured the team stack's state folder: %s", "; ".join(narrowed))
        info = self.info() | {"services": services, "notices": self.notices, "secured": narrowed}
        (self.state / "team_stack.json").write_text(json.dumps(info, indent=1) + "\n")
        return info

    def down(self) -> dict:
        disconnected = self.disconnect_client()
        stopped = [name for name in ("zenml", "mlflow", "s3") if self._stop(name)]
        if self.stop_postgres():
            stopped.append("postgres")
        return {"stopped": stopped, "client_returned_to_local_store": disconnected, "kept": str(self.state)}

    def info(self) -> dict:
        return {
            "stack": STACK,
            "zenml_url": self.zenml_url,
            "dashboard": self.zenml_url,
            "mlflow_tracking_uri": self.mlflow_url,
            "s3_endpoint": self.s3_url,
            "artifact_store": self.artifact_root,
            "mlflow_artifacts": f"s3://{self.bucket}/mlflow",
            "backend_store": self.backend_store_uri(),
            "state": str(self.state),
        }

    def status(self) -> dict:
        return self.info() | {
            "running": {
                "s3": healthy(self.s3_url + f"/{self.bucket}"),
                "mlflow": healthy(self.mlflow_url + "/health"),
                "zenml": healthy(self.zenml_url + "/health"),
                "postgres": (self.pg_data / "postmaster.pid").is_file(),
            }
        }


@dataclass
class PostgresUser:
    """PostgreSQL refuses to run as root: as root, its files belong to and its commands run as `postgres`."""

    prefix: list[str]
    uid: int | None = None
    gid: int | None = None

    def chown(self, path: Path) -> None:
        if self.uid is not None:
            os.chown(path, self.uid, self.gid)


def as_postgres_user(data: Path, sockets: Path) -> PostgresUser:
    if os.geteuid() != 0:
        return PostgresUser([])
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise TeamStackError("running as root, and there is no `postgres` user to run PostgreSQL as") from None
    return PostgresUser(["runuser", "-u", "postgres", "--"], entry.pw_uid, entry.pw_gid)


def postgres_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


# s3rver 3.7.1's filesystem store skips every directory two levels below the listed prefix when a delimiter is
# given, so a "folder" holding only sub-folders (an MLflow model's code/xray/...) is missing from CommonPrefixes and
# MLflow downloads a model without its code. Walking those directories too is all the fix needs: the key loop
# below it already folds their keys into the common prefixes.
S3RVER_PATCH = (
    "lib/stores/filesystem.js",
    """        if (
          delimiterEnc &&
          dirPath.slice(prefixPath.length).indexOf(delimiterEnc) !== -1
        ) {
          // avoid directories occurring beneath a common prefix
          return false;
        }
""",
    """        // xray-pipeline: directories beneath a common prefix are walked too (see infra/team_stack.py)
""",
)


def patch_s3rver(package: Path) -> None:
    path = package / S3RVER_PATCH[0]
    text = path.read_text()
    if S3RVER_PATCH[2] in text:
        return
    if S3RVER_PATCH[1] not in text:
        raise TeamStackError(
            f"cannot apply the nested-prefix listing fix to {path}: not s3rver {S3RVER_VERSION}'s code"
        )
    path.write_text(text.replace(S3RVER_PATCH[1], S3RVER_PATCH[2]))


def s3rver_binary() -> Path:
    """s3rver from the npm registry, installed once into .cache/ and patched (S3RVER_PATCH)."""
    binary = S3RVER_HOME / "node_modules" / ".bin" / "s3rver"
    if binary.is_file():
        patch_s3rver(S3RVER_HOME / "node_modules" / "s3rver")
        return binary
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise TeamStackError(
            "the team stack's S3 endpoint is s3rver, an npm package: install Node.js and npm "
            "(apt-get install nodejs npm) and run again"
        )
    logger.info("installing s3rver %s from npm into %s", S3RVER_VERSION, S3RVER_HOME)
    S3RVER_HOME.mkdir(parents=True, exist_ok=True)
    run(
        [
            "npm",
            "install",
            "--prefix",
            str(S3RVER_HOME),
            "--no-audit",
            "--no-fund",
            "--loglevel",
            "error",
            f"s3rver@{S3RVER_VERSION}",
        ],
        "npm install s3rver",
    )
    patch_s3rver(S3RVER_HOME / "node_modules" / "s3rver")
    return binary


def run(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ | (env or {}))
    if result.returncode != 0:
        raise TeamStackError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout).strip()[-2000:]}")


def healthy(url: str, timeout_s: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status < 400
    except Exception:  # noqa: BLE001 - anything but an answer means "not up yet"
        return False


def zenml_login(url: str, username: str, password: str) -> str | None:
    """An access token from the ZenML server's OAuth2 password login, None when it refuses the password."""
    import urllib.error
    import urllib.parse

    form = urllib.parse.urlencode({"username": username, "password": password}).encode()
    request = urllib.request.Request(f"{url}/api/v1/login", data=form, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["access_token"]
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return None
        raise TeamStackError(f"the ZenML server's login answered {error.code}") from None


def zenml_request(url: str, path: str, token: str, body: dict | None = None, method: str = "GET") -> dict:
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


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


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def from_args(args: argparse.Namespace) -> TeamStack:
    return TeamStack(
        state=Path(args.state).resolve(),
        zenml_port=args.zenml_port,
        mlflow_port=args.mlflow_port,
        s3_port=args.s3_port,
        pg_port=args.pg_port,
        timeout_s=args.timeout,
    )


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m infra.team_stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--state", default=env("XRAY_TEAM_STATE", str(ROOT / ".team")))
    parser.add_argument("--zenml-port", type=int, default=int(env("XRAY_TEAM_ZENML_PORT", "8237")))
    parser.add_argument("--mlflow-port", type=int, default=int(env("XRAY_TEAM_MLFLOW_PORT", "5050")))
    parser.add_argument("--s3-port", type=int, default=int(env("XRAY_TEAM_S3_PORT", "9010")))
    parser.add_argument("--pg-port", type=int, default=int(env("XRAY_TEAM_PG_PORT", "5433")))
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(env("XRAY_TEAM_TIMEOUT_S", "120")),
        help="seconds each service may take to become healthy",
    )
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("team stack: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # ZenML, once imported, logs the root logger's records a second time
    stack = from_args(args)
    try:
        result = getattr(stack, args.command)()
    except TeamStackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
