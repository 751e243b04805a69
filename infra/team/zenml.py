"""The team stack's ZenML server (uvicorn, OAuth2 password login, its own config folder and SQLite database under
state/zenml, the dashboard at /), logging in to it, the zenml client's store, and the ZenML stack `team`."""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from infra.pidfile import recorded_pid
from infra.team.credentials import Credentials
from infra.team.processes import Processes, TeamStackError
from infra.team.s3 import REGION, S3, S3_KEY, S3_SECRET

logger = logging.getLogger("team_stack")
ZENML_USER = "default"
STACK = "team"


def zenml_login(url: str, username: str, password: str) -> str | None:
    """An access token from the ZenML server's OAuth2 password login, None when it refuses the password."""
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


@dataclass
class ZenMLServer:
    processes: Processes
    credentials: Credentials
    s3: S3
    port: int = 8237
    _token: str = field(default="", init=False, repr=False)  # logged in once per process

    @property
    def url(self) -> str:
        return self.processes.url(self.port)

    @property
    def health_url(self) -> str:
        return self.url + "/health"

    def start(self, wait: bool = True) -> str:
        """Start the ZenML server; with ``wait=False`` return once it is spawned (:meth:`await_started` awaits it)."""
        if self.processes.running("zenml", self.health_url):
            return "running"
        self.processes.port_free("zenml", self.port)
        home = self.processes.state / "zenml"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            "ZENML_SERVER": "true",
            "ZENML_CONFIG_PATH": str(home / "config"),
            "ZENML_STORE_URL": f"sqlite:///{home / 'zenml.db'}",
            "ZENML_SERVER_AUTH_SCHEME": "OAUTH2_PASSWORD_BEARER",
            "ZENML_DEFAULT_USER_NAME": ZENML_USER,
            "ZENML_DEFAULT_USER_PASSWORD": self.credentials.read()["zenml_password"],
            "ZENML_SERVER_JWT_SECRET_KEY": self.credentials.read()["zenml_jwt_secret_key"],
            "ZENML_SERVER_DEPLOYMENT_TYPE": "local",
            "ZENML_SERVER_AUTO_ACTIVATE": "True",
            "ZENML_SERVER_ALLOW_LOCAL_FILE_ACCESS": "true",
            "ZENML_ANALYTICS_OPT_IN": "false",
        } | self.s3.env()
        command = [sys.executable, "-m", "uvicorn", "zenml.zen_server.zen_server_api:app"]
        command += ["--host", self.processes.host, "--port", str(self.port), "--log-level", "warning"]
        pid = self.processes.spawn("zenml", command, env)
        if wait:
            self.processes.wait_healthy("zenml", self.health_url, pid)
        return "started"

    def await_started(self) -> None:
        """Wait for a server that :meth:`start` spawned with ``wait=False``: the pid spawned, even where it has
        exited meanwhile, so that the wait says so at once instead of at its deadline."""
        self.processes.wait_healthy("zenml", self.health_url, recorded_pid(self.processes.pid_file("zenml")))

    def token(self) -> str:
        """A bearer token for the ZenML server's REST API. A server started by an older stack (NO_AUTH) has the user
        `default` with an empty password: it gets the generated one first."""
        if self._token:
            return self._token
        password = self.credentials.read()["zenml_password"]
        token = zenml_login(self.url, ZENML_USER, password)
        if token is not None:
            self._token = token
            return token
        old = zenml_login(self.url, ZENML_USER, "")
        if old is None:
            raise TeamStackError(
                f"the ZenML server refuses user '{ZENML_USER}' with the password in {self.credentials.file} "
                "(or XRAY_TEAM_ZENML_PASSWORD)"
            )
        body = {"password": password, "old_password": ""}
        zenml_request(self.url, "/api/v1/current-user", old, body, "PUT")
        logger.info("the ZenML server now asks for a password (it had none before)")
        self._token = zenml_login(self.url, ZENML_USER, password)
        return self._token

    def connect_client(self) -> None:
        """What `zenml login --username --password` does: the global config's store becomes the server, and the
        password goes into ZenML's credentials store (the user's config folder), from which the client logs in."""
        from zenml.config.global_config import GlobalConfiguration
        from zenml.login.credentials_store import get_credentials_store
        from zenml.zen_stores.rest_zen_store import RestZenStoreConfiguration

        self.token()  # the password is right (set on an older server first)
        password = self.credentials.read()["zenml_password"]
        credentials = get_credentials_store()
        credentials.set_password(self.url, ZENML_USER, password)
        os.chmod(credentials._credentials_file, 0o600)  # ZenML writes it 0644; it holds the password now
        config = GlobalConfiguration()
        if config.store_configuration.url != self.url:
            config.set_store(RestZenStoreConfiguration(url=self.url))

    def disconnect_client(self) -> bool:
        """The client back to its local store, if it is on this server."""
        from zenml.config.global_config import GlobalConfiguration

        config = GlobalConfiguration()
        if config.store_configuration.url != self.url:
            return False
        config.set_default_store()
        return True

    def skip_onboarding(self) -> None:
        """The dashboard's first-run form (account details, survey) is shown while the user's email_opted_in is
        unset and the survey unfinished; answer both for the server's user. Only PUT /current-user may set
        email_opted_in (the users endpoint drops it)."""
        body = {
            "email_opted_in": False,
            "user_metadata": {"finished_onboarding_survey": True, "awareness_channels": ["team-stack"]},
        }
        user = zenml_request(self.url, "/api/v1/current-user", self.token(), body, "PUT")
        if user["body"]["email_opted_in"] is not False:
            raise TeamStackError("the ZenML server did not record the dashboard's onboarding answers")

    def register_stack(self, mlflow_url: str) -> str:
        """The ZenML stack `team` (S3 artifact store, MLflow tracker and registry on ``mlflow_url``), once; the
        tracker's secret (the trainer's MLflow password) on every call. Through the client connected to this server."""
        from zenml.client import Client

        client = Client()
        self.skip_onboarding()
        tracker_secret = f"{STACK}-mlflow"
        # The tracker logs in to MLflow as the trainer: it registers versions and never moves `champion`.
        values = {"username": "trainer", "password": self.credentials.read()["mlflow_trainer_password"]}
        if client.list_secrets(name=tracker_secret).items:
            client.update_secret(tracker_secret, add_or_update_values=values)
        else:
            client.create_secret(tracker_secret, values=values)
        if any(s.name == STACK for s in client.list_stacks(name=STACK)):
            return "registered"
        self._create_stack(client, mlflow_url, tracker_secret)
        return "created"

    def _create_stack(self, client, mlflow_url: str, tracker_secret: str) -> None:
        from zenml.enums import StackComponentType as Kind

        secret = f"{STACK}-s3"
        if not client.list_secrets(name=secret).items:
            client.create_secret(secret, values={"key": S3_KEY, "secret": S3_SECRET})
        store = {
            "path": self.s3.zenml_root,
            "key": f"{{{{{secret}.key}}}}",
            "secret": f"{{{{{secret}.secret}}}}",
            "client_kwargs": {"endpoint_url": self.s3.url, "region_name": REGION},
        }
        client.create_stack_component(f"{STACK}-s3", "s3", Kind.ARTIFACT_STORE, store)
        tracker = {
            "tracking_uri": mlflow_url,
            "tracking_username": f"{{{{{tracker_secret}.username}}}}",
            "tracking_password": f"{{{{{tracker_secret}.password}}}}",
        }
        client.create_stack_component(f"{STACK}-mlflow", "mlflow", Kind.EXPERIMENT_TRACKER, tracker)
        client.create_stack_component(f"{STACK}-mlflow-registry", "mlflow", Kind.MODEL_REGISTRY, {})
        components = {
            Kind.ORCHESTRATOR: "default",
            Kind.ARTIFACT_STORE: f"{STACK}-s3",
            Kind.EXPERIMENT_TRACKER: f"{STACK}-mlflow",
            Kind.MODEL_REGISTRY: f"{STACK}-mlflow-registry",
        }
        client.create_stack(STACK, components=components)
