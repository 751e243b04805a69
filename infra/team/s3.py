"""The team stack's S3 endpoint: s3rver (npm), which keeps every object as files under state/s3, on loopback only.

s3rver verifies no keys (its built-in ones below are what every client sends), so it listens on 127.0.0.1 only
(docs/OPERATIONS.md). It is installed once into .cache/ and patched (S3RVER_PATCH)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from infra.team.processes import Processes, TeamStackError, npm_install
from xray.environment import REPO_ROOT

logger = logging.getLogger("team_stack")
S3RVER_VERSION = "3.7.1"
S3RVER_HOME = REPO_ROOT / ".cache" / f"s3rver-{S3RVER_VERSION}"
# s3rver's built-in credentials: it verifies none, so the endpoint only listens on 127.0.0.1 (docs/OPERATIONS.md).
S3_KEY = S3_SECRET = "S3RVER"
REGION = "us-east-1"

# s3rver 3.7.1's filesystem store skips every directory two levels below the listed prefix when a delimiter is
# given, so a "folder" holding only sub-folders (an MLflow model's code/xray/...) is missing from CommonPrefixes and
# MLflow downloads a model without its code. Walking those directories too is all the fix needs: the key loop
# below it already folds their keys into the common prefixes. The replacement still names infra/team_stack.py, where
# this lived before: an install patched then is recognised as patched by that exact text.
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


@dataclass
class S3:
    """s3rver on ``port``, with ``bucket`` (ZenML's artifacts under zenml/, MLflow's under mlflow/)."""

    processes: Processes
    port: int = 9010
    bucket: str = "xray-team"

    @property
    def url(self) -> str:
        return self.processes.url(self.port)

    @property
    def health_url(self) -> str:
        return f"{self.url}/{self.bucket}"

    @property
    def zenml_root(self) -> str:
        """Where ZenML writes artifacts."""
        return f"s3://{self.bucket}/zenml"

    @property
    def mlflow_root(self) -> str:
        """Where MLflow's server keeps artifacts (it proxies them)."""
        return f"s3://{self.bucket}/mlflow"

    def env(self) -> dict[str, str]:
        """What a client of the endpoint reads (boto3, s3fs, MLflow's artifact repository)."""
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.url,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET, region_name=REGION
        )

    def start(self) -> str:
        if self.processes.running("s3", self.health_url):
            return "running"
        self.processes.port_free("s3", self.port)
        binary = s3rver_binary()
        data = self.processes.state / "s3"
        data.mkdir(parents=True, exist_ok=True)
        # s3rver makes ListObjectsV2 continuation tokens with DES, which Node's OpenSSL 3 only has in its legacy
        # provider: without it every truncated listing (s3fs asks for MaxKeys=1 to test a prefix) is a 500.
        node_options = " ".join(filter(None, [os.environ.get("NODE_OPTIONS"), "--openssl-legacy-provider"]))
        command = [str(binary), "--directory", str(data), "--address", self.processes.host, "--port", str(self.port)]
        pid = self.processes.spawn("s3", [*command, "--configure-bucket", self.bucket], {"NODE_OPTIONS": node_options})
        self.processes.wait_healthy("s3", self.health_url, pid)
        return "started"


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
    npm_install(S3RVER_HOME, f"s3rver@{S3RVER_VERSION}")
    patch_s3rver(S3RVER_HOME / "node_modules" / "s3rver")
    return binary
