"""The team stack's secrets: every password from its XRAY_TEAM_* variable, else generated once into
``state/credentials.json`` (mode 0600); and the state folder's modes (0700, secret files 0600)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("team_stack")
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
SECRET_PATHS = ("credentials.json", "zenml", "mlflow", "logs", "run")
"""Under the state folder: what holds a secret (the passwords, ZenML's database with the tracker's secret, MLflow's
SQLite users when PostgreSQL is absent) or may (logs)."""


@dataclass
class Credentials:
    state: Path
    _values: dict[str, str] = field(default_factory=dict, init=False, repr=False)  # read (or made) once per process

    @property
    def file(self) -> Path:
        return self.state / "credentials.json"

    def read(self) -> dict[str, str]:
        """Every service password the stack uses (keys of PASSWORDS); never logged, never in a status line."""
        if self._values:
            return self._values
        stored = json.loads(self.file.read_text()) if self.file.is_file() else {}
        wanted = {key: os.environ.get(variable) for key, variable in PASSWORDS.items()}
        missing = {k for k, v in wanted.items() if not v and k not in stored}
        if missing:
            stored |= {k: secrets.token_urlsafe(24) for k in missing}
            self.state.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                json.dump(stored, handle)
            os.chmod(self.file, 0o600)
            logger.info("generated the team stack's passwords into %s (readable by you only)", self.file)
        self._values = stored | {k: v for k, v in wanted.items() if v}
        return self._values

    def mlflow_account(self, user: str) -> dict[str, str]:
        """MLflow's client reads its credentials from these variables (the stack's tracker sets the trainer's)."""
        return {
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self.read()[f"mlflow_{user}_password"],
        }


def secure_state(state: Path, pg_sockets: Path, report: bool = True) -> list[str]:
    """The state folder 0700, and every file of SECRET_PATHS 0600 (their folders 0700), except PostgreSQL's socket
    folder (``pg_sockets``, when it is in there); a wider mode is narrowed and reported in one line. Returns what was
    narrowed."""
    narrowed = []

    def narrow(path: Path, mode: int) -> None:
        current = stat.S_IMODE(path.lstat().st_mode)
        if current & ~mode and not path.is_symlink() and path.owner() == state.owner():
            path.chmod(current & mode)
            narrowed.append(f"{path.relative_to(state.parent)} {current:04o} -> {current & mode:04o}")

    state.mkdir(parents=True, exist_ok=True)
    narrow(state, 0o700)
    for name in SECRET_PATHS:
        top = state / name
        for path in [top, *top.rglob("*")] if top.is_dir() else [top] if top.exists() else []:
            if path != pg_sockets and pg_sockets not in path.parents:
                narrow(path, 0o700 if path.is_dir() else 0o600)
    if narrowed and report:
        logger.warning("secured the team stack's state folder: %s", "; ".join(narrowed))
    return narrowed
