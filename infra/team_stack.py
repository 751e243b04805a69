"""The team stack on one machine: a ZenML server, an MLflow tracking server on PostgreSQL, an S3 endpoint that
keeps its objects on disk, and the ZenML stack `team` that uses them.

    python -m infra.team_stack up      # start what is not running, connect the zenml client, register `team`
    python -m infra.team_stack down    # disconnect the client (back to the local store), stop every process
    python -m infra.team_stack status  # one JSON line: services, URLs, pids

`make team-stack` / `make team-stack-down` call these. Everything lives under the state folder (`.team/` by
default): the S3 objects, the PostgreSQL cluster, the ZenML server's database, logs and pid files. `down` keeps
it, so the next `up` finds every run, model and artifact again. Ports come from flags or XRAY_TEAM_* variables.

Parts (docs/OPERATIONS.md "Team stack"), one module each under infra/team/, composed here by TeamStack:
  s3.py        s3rver (npm, objects as files under state/s3)                            http://127.0.0.1:S3_PORT
  postgres.py  PostgreSQL (initdb into state/postgres, password auth; SQLite with a notice if absent)
                                                                                        127.0.0.1:PG_PORT
  mlflow.py    mlflow server --app-name xray-basic-auth (infra/mlflow_auth.py), runs and users in PostgreSQL,
               artifacts in S3; its accounts and their grants                           http://127.0.0.1:MLFLOW_PORT
  zenml.py     ZenML server (uvicorn, OAuth2 password login, SQLite under state/zenml, dashboard at /); the
               client's login and the ZenML stack `team`                                http://127.0.0.1:ZENML_PORT
  processes.py pid files, logs, health waits, stopping; credentials.py the passwords and the state folder's modes

Accounts (passwords from XRAY_TEAM_* variables, else generated once into state/credentials.json, mode 0600,
infra/team/credentials.py):
  ZenML `default` (the client logs in with it); MLflow `admin` (sets up the others), `trainer` (EDIT: runs,
  versions, the candidate alias; the stack's tracker uses it) and `reviewer` (MANAGE on every registered model:
  approve, reject, roll back); PostgreSQL `mlflow`. S3 (s3rver) checks no keys: it listens on loopback only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from infra.team.credentials import Credentials, secure_state
from infra.team.mlflow import MLflowServer
from infra.team.postgres import Postgres
from infra.team.processes import Processes, TeamStackError, healthy
from infra.team.s3 import S3
from infra.team.zenml import STACK, ZenMLServer
from xray.environment import REPO_ROOT

logger = logging.getLogger("team_stack")


@dataclass
class TeamStack:
    """The stack's settings, and its services built from them (``processes``, ``credentials``, ``s3``, ``postgres``,
    ``mlflow``, ``zenml``), which share one read of the credentials per process."""

    state: Path = REPO_ROOT / ".team"
    host: str = "127.0.0.1"
    zenml_port: int = 8237
    mlflow_port: int = 5050
    s3_port: int = 9010
    pg_port: int = 5433
    bucket: str = "xray-team"
    timeout_s: float = 120.0
    notices: list[str] = field(default_factory=list)
    processes: Processes = field(init=False, repr=False)
    credentials: Credentials = field(init=False, repr=False)
    s3: S3 = field(init=False, repr=False)
    postgres: Postgres = field(init=False, repr=False)
    mlflow: MLflowServer = field(init=False, repr=False)
    zenml: ZenMLServer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.processes = Processes(self.state, self.host, self.timeout_s)
        self.credentials = Credentials(self.state)
        self.s3 = S3(self.processes, self.s3_port, self.bucket)
        self.postgres = Postgres(self.state, self.credentials, self.host, self.pg_port, self.timeout_s, self.notices)
        self.mlflow = MLflowServer(self.processes, self.credentials, self.postgres, self.s3, self.mlflow_port)
        self.zenml = ZenMLServer(self.processes, self.credentials, self.s3, self.zenml_port)

    def up(self) -> dict:
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        narrowed = secure_state(self.state, self.postgres.sockets, report=False)
        # The ZenML server is the slowest to come up (its database migrations) and needs none of the others: it starts
        # first and is awaited last, while S3, PostgreSQL and MLflow start in turn.
        zenml = self.zenml.start(wait=False)
        services = {"s3": self.s3.start(), "postgres": self.postgres.start(), "mlflow": self.mlflow.start()}
        self.mlflow.ensure_accounts()
        if zenml == "started":
            self.zenml.await_started()
        services["zenml"] = zenml
        self.zenml.connect_client()
        services["stack"] = self.zenml.register_stack(self.mlflow.url)
        # what the services made before their umask applied (an old one)
        narrowed += secure_state(self.state, self.postgres.sockets, report=False)
        if narrowed:
            logger.warning("secured the team stack's state folder: %s", "; ".join(narrowed))
        info = self.info() | {"services": services, "notices": self.notices, "secured": narrowed}
        (self.state / "team_stack.json").write_text(json.dumps(info, indent=1) + "\n")
        return info

    def down(self) -> dict:
        disconnected = self.zenml.disconnect_client()
        stopped = [name for name in ("zenml", "mlflow", "s3") if self.processes.stop(name)]
        if self.postgres.stop():
            stopped.append("postgres")
        return {"stopped": stopped, "client_returned_to_local_store": disconnected, "kept": str(self.state)}

    def info(self) -> dict:
        return {
            "stack": STACK,
            "zenml_url": self.zenml.url,
            "dashboard": self.zenml.url,
            "mlflow_tracking_uri": self.mlflow.url,
            "s3_endpoint": self.s3.url,
            "artifact_store": self.s3.zenml_root,
            "mlflow_artifacts": self.s3.mlflow_root,
            "backend_store": self.postgres.backend_store_uri(),
            "state": str(self.state),
        }

    def status(self) -> dict:
        return self.info() | {
            "running": {
                "s3": healthy(self.s3.health_url),
                "mlflow": healthy(self.mlflow.health_url),
                "zenml": healthy(self.zenml.health_url),
                "postgres": self.postgres.running(),
            }
        }


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
    parser.add_argument("--state", default=env("XRAY_TEAM_STATE", str(REPO_ROOT / ".team")))
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
