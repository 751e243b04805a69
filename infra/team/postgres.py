"""MLflow's backend store: a PostgreSQL cluster of the team stack's own, password (SCRAM) authentication, loopback
only; SQLite under state/mlflow, with a notice, where PostgreSQL is not installed.

As root, PostgreSQL runs as `postgres` (it refuses root), which must not reach into the state folder (0700, it holds
the passwords): then the cluster and its sockets live under `postgres`'s home (:attr:`Postgres.home`)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from infra.pidfile import recorded_pid
from infra.team.credentials import Credentials
from infra.team.processes import TeamStackError, run
from xray.environment import process_running

logger = logging.getLogger("team_stack")
DATABASES = ("mlflow", "mlflow_auth")  # MLflow's runs and registry; its basic-auth users and grants


@dataclass
class PostgresUser:
    """PostgreSQL refuses to run as root: as root, its files belong to and its commands run as `postgres`."""

    prefix: list[str]
    uid: int | None = None
    gid: int | None = None

    def chown(self, path: Path) -> None:
        if self.uid is not None:
            os.chown(path, self.uid, self.gid)


def as_postgres_user() -> PostgresUser:
    if os.geteuid() != 0:
        return PostgresUser([])
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise TeamStackError("running as root, and there is no `postgres` user to run PostgreSQL as") from None
    return PostgresUser(["runuser", "-u", "postgres", "--"], entry.pw_uid, entry.pw_gid)


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: the newest under /usr/lib/postgresql, else on PATH; None if neither."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


@dataclass
class Postgres:
    state: Path
    credentials: Credentials
    host: str = "127.0.0.1"
    port: int = 5433
    timeout_s: float = 120.0
    notices: list[str] = field(default_factory=list)  # the stack's, shared: `up` reports them

    @property
    def home(self) -> Path:
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
    def data(self) -> Path:
        return self.state / "postgres" if self.home == self.state else self.home / "data"

    @property
    def sockets(self) -> Path:
        return self.state / "run" / "pg" if self.home == self.state else self.home / "sockets"

    def running(self) -> bool:
        """Whether our cluster's postmaster runs: the pid in postmaster.pid names a live process (not a zombie) whose
        working folder is the cluster (PostgreSQL runs in its data folder). A crash or a kill -9 leaves the file, and
        after a reset its pid may be another process's: neither is taken for the server, nor signalled by `stop`."""
        pid = recorded_pid(self.data / "postmaster.pid")
        if pid is None or not process_running(pid):
            return False
        try:
            return Path(f"/proc/{pid}/cwd").resolve(strict=True) == self.data.resolve()
        except OSError:  # gone meanwhile, or another user's process
            return False

    def env(self) -> dict[str, str]:
        """What PostgreSQL's clients (psql, MLflow's psycopg2) read the password from: never a command line or URI."""
        return {"PGPASSWORD": self.credentials.read()["postgres_password"]}

    def backend_store_uri(self, database: str = "mlflow") -> str:
        """MLflow's runs and registry (``mlflow``) or its basic-auth users and grants (``mlflow_auth``)."""
        if postgres_bin() is None:
            return f"sqlite:///{self.state / 'mlflow' / (database + '.db')}"
        return f"postgresql://mlflow@{self.host}:{self.port}/{database}"

    def server_env(self) -> dict[str, str]:
        """What MLflow's server needs to reach its backend store: the password, when that is PostgreSQL."""
        return self.env() if postgres_bin() is not None else {}

    def start(self) -> str:
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
        as_user = as_postgres_user()
        self._move_out_of_state(bin_dir, as_user)
        if not (self.data / "PG_VERSION").is_file():
            self._initdb(bin_dir, as_user)
        self.sockets.mkdir(parents=True, exist_ok=True)
        as_user.chown(self.sockets)
        status = "running"
        if not self.running():  # a stale postmaster.pid (a crash) PostgreSQL clears itself
            self._start(bin_dir, as_user)
            status = "started"
        self._require_passwords(bin_dir, as_user)
        self._create_databases(bin_dir)
        return status

    def stop(self) -> bool:
        bin_dir = postgres_bin()
        if bin_dir is None or not self.running():
            if bin_dir is not None and (self.data / "postmaster.pid").is_file():
                logger.warning(
                    "PostgreSQL was not running (it crashed or was killed); its next start clears %s",
                    self.data / "postmaster.pid",
                )
            return False
        self._pg_ctl(bin_dir, as_postgres_user(), "-m", "fast", "-w", "stop")
        return True

    def _pg_ctl(self, bin_dir: Path, as_user: PostgresUser, *args: str, check: bool = True) -> int:
        """``pg_ctl -D DATA ARGS`` as ``as_user``; its exit status, an error when ``check`` and it failed."""
        command = [*as_user.prefix, str(bin_dir / "pg_ctl"), "-D", str(self.data), *args]
        if check:
            run(command, f"pg_ctl {args[-1]}")
            return 0
        return subprocess.run(command, capture_output=True, text=True).returncode

    def _initdb(self, bin_dir: Path, as_user: PostgresUser) -> None:
        """A new cluster whose superuser `mlflow` has the stack's password and whose every connection needs it."""
        self.data.mkdir(parents=True, exist_ok=True)
        as_user.chown(self.data)
        password_file = self.sockets.parent / "pg-password"  # where `postgres` can read it
        password_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(self.credentials.read()["postgres_password"] + "\n")
        as_user.chown(password_file)
        try:
            initdb = [*as_user.prefix, str(bin_dir / "initdb"), "-D", str(self.data), "-U", "mlflow"]
            run([*initdb, "--auth=scram-sha-256", f"--pwfile={password_file}", "-E", "UTF8"], "initdb")
        finally:
            password_file.unlink(missing_ok=True)

    def _start(self, bin_dir: Path, as_user: PostgresUser) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses={self.host}"
        log = str(self.data / "server.log")
        self._pg_ctl(bin_dir, as_user, "-o", options, "-l", log, "-w", "-t", str(int(self.timeout_s)), "start")

    def _create_databases(self, bin_dir: Path) -> None:
        """MLflow's databases, those missing; an error when the server does not take the password."""
        client = ["-h", self.host, "-p", str(self.port), "-U", "mlflow"]
        exists = subprocess.run(
            [str(bin_dir / "psql"), *client, "-d", "postgres", "-tAc", "SELECT datname FROM pg_database"],
            capture_output=True,
            text=True,
            env=os.environ | self.env(),
        )
        if exists.returncode != 0:
            raise TeamStackError(f"PostgreSQL on port {self.port} does not answer: {exists.stderr.strip()}")
        for database in set(DATABASES) - set(exists.stdout.split()):
            run([str(bin_dir / "createdb"), *client, database], "createdb", self.env())

    def _require_passwords(self, bin_dir: Path, as_user: PostgresUser) -> None:
        """A cluster made by an earlier version of this stack trusts every local connection: give `mlflow` its
        password (over the cluster's own socket, the statement on stdin) and switch pg_hba.conf to SCRAM."""
        hba = self.data / "pg_hba.conf"
        rules = [line for line in hba.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not any(line.split()[-1] == "trust" for line in rules):
            return
        password = self.credentials.read()["postgres_password"].replace("'", "''")
        result = subprocess.run(
            [*as_user.prefix, str(bin_dir / "psql"), "-h", str(self.sockets), "-p", str(self.port)]
            + ["-U", "mlflow", "-d", "postgres", "-w", "-v", "ON_ERROR_STOP=1", "-q", "-f", "-"],
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
        self._pg_ctl(bin_dir, as_user, "reload")
        logger.info("PostgreSQL now asks for a password (it trusted local connections before)")

    def _move_out_of_state(self, bin_dir: Path, as_user: PostgresUser) -> None:
        """A cluster an earlier version made inside the state folder as root moves to :attr:`data` (stopped first),
        so that the state folder can be 0700."""
        old = self.state / "postgres"
        if old == self.data or not (old / "PG_VERSION").is_file() or (self.data / "PG_VERSION").is_file():
            if self.home != self.state:
                self._make_home(as_user)
            return
        if (old / "postmaster.pid").is_file():
            run([*as_user.prefix, str(bin_dir / "pg_ctl"), "-D", str(old), "-m", "fast", "-w", "stop"], "pg_ctl stop")
        self._make_home(as_user)
        shutil.move(str(old), str(self.data))
        logger.info("moved PostgreSQL's cluster from %s to %s (the state folder is now 0700)", old, self.data)

    def _make_home(self, as_user: PostgresUser) -> None:
        for folder in (self.home.parent, self.home):
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir(exist_ok=True, mode=0o700)
            folder.chmod(0o700)
            as_user.chown(folder)
