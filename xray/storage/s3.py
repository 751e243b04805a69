"""S3 access with boto3's default credential chain, retries and checksums.

Credentials come from the environment or a profile only; ``AWS_ENDPOINT_URL_S3``
is honoured by boto3 itself, which is how the embedded moto endpoint and
S3-compatible stores are reached.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlparse

from xray.errors import DatasetSourceError

if TYPE_CHECKING:
    from werkzeug.serving import BaseWSGIServer

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_uri(uri: str) -> S3Location:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise DatasetSourceError(f"not an s3://bucket/key URI: {uri}")
    return S3Location(parsed.netloc, parsed.path.lstrip("/"))


def local_path(uri: str) -> Path | None:
    """The filesystem path for a local or file:// URI, None for s3://."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return None
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise DatasetSourceError(
            f"unsupported dataset URI scheme '{parsed.scheme}://' in {uri}; use s3://, file:// or a path"
        )
    return Path(uri).expanduser()


@functools.cache
def _loader():
    """botocore's loader of its service and endpoint models, one per process: every client of make_client shares it."""
    from botocore.loaders import create_loader  # lazy: only S3 access needs botocore

    return create_loader()


def make_client(max_attempts: int = 5, connect_timeout: float = 10, read_timeout: float = 60):
    """An S3 client of a new session (credentials, region and endpoint read from the environment now), whose
    service models come from one loader per process: parsing them again costs 60 ms per client, 11 ms with them
    loaded."""
    import boto3  # lazy: only S3 access needs boto3
    import botocore.session  # lazy: only S3 access needs botocore
    from botocore.config import Config  # lazy: only S3 access needs botocore

    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    session = botocore.session.get_session()
    session.register_component("data_loader", _loader())
    return boto3.session.Session(botocore_session=session).client("s3", config=config)


def explain_error(error: Exception, location: S3Location) -> DatasetSourceError:
    """One line naming the URI and the cause, never the credentials."""
    # lazy: only S3 access needs botocore
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", "Unknown"))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        reasons = {
            "NoSuchBucket": "bucket does not exist",
            "NoSuchKey": "object does not exist",
            "404": "object or bucket does not exist",
            "NotFound": "object or bucket does not exist",
            "AccessDenied": "access denied",
            "403": "access denied (check the credentials and the bucket policy)",
            "Forbidden": "access denied (check the credentials and the bucket policy)",
            "InvalidAccessKeyId": "the AWS access key id is not valid",
            "SignatureDoesNotMatch": "the AWS secret key does not match the access key",
        }
        reason = reasons.get(code, f"S3 error {code} (HTTP {status})")
    elif isinstance(error, NoCredentialsError):
        reason = "no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
    elif isinstance(error, EndpointConnectionError):
        reason = f"S3 endpoint unreachable ({error.kwargs.get('endpoint_url', 'unknown endpoint')})"
    else:
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
    return DatasetSourceError(f"cannot read {location.uri}: {reason}")


def head(client, location: S3Location) -> dict:
    from botocore.exceptions import BotoCoreError, ClientError  # lazy: only S3 access needs botocore

    try:
        response = client.head_object(Bucket=location.bucket, Key=location.key)
    except (BotoCoreError, ClientError) as error:
        raise explain_error(error, location) from None
    return {
        "etag": response["ETag"].strip('"'),
        "size": int(response["ContentLength"]),
        "sha256": response.get("Metadata", {}).get("sha256"),
    }


def download(
    client,
    location: S3Location,
    destination: Path,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Stream the object to ``destination`` and return etag, size and sha256.

    The body is read in chunks so a multi-GB archive never sits in memory, and
    the SHA-256 is computed on the bytes actually written.
    """
    from botocore.exceptions import BotoCoreError, ClientError  # lazy: only S3 access needs botocore

    digest = hashlib.sha256()
    written = 0
    try:
        response = client.get_object(Bucket=location.bucket, Key=location.key)
        total = int(response["ContentLength"])
        with open(destination, "wb") as out:
            for chunk in response["Body"].iter_chunks(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                if progress:
                    progress(written, total)
    except (BotoCoreError, ClientError) as error:
        raise explain_error(error, location) from None
    if written != total:
        raise DatasetSourceError(f"cannot read {location.uri}: got {written} of {total} bytes")
    return {"etag": response["ETag"].strip('"'), "size": written, "sha256": digest.hexdigest()}


def upload_if_missing(client, source: Path, location: S3Location) -> bool:
    """Upload ``source`` unless the object there already holds the same bytes (by SHA-256)."""
    from botocore.exceptions import ClientError  # lazy: only S3 access needs botocore

    try:
        client.head_bucket(Bucket=location.bucket)
    except ClientError:
        client.create_bucket(Bucket=location.bucket)
    digest = sha256_file(source)
    try:
        if head(client, location)["sha256"] == digest:
            return False
    except DatasetSourceError:
        pass
    client.upload_file(str(source), location.bucket, location.key, ExtraArgs={"Metadata": {"sha256": digest}})
    return True


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedS3:
    """A moto S3 server on 127.0.0.1, for the default local run and for tests.

    Each one starts empty. It sets ``AWS_ENDPOINT_URL_S3`` and fake credentials for this process (the
    local orchestrator runs steps in-process), and restores them on stop.
    """

    FAKE_ENV = {
        "AWS_ACCESS_KEY_ID": "embedded-moto",
        "AWS_SECRET_ACCESS_KEY": "embedded-moto",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._saved: dict[str, str | None] = {}

    def start(self) -> "EmbeddedS3":
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app  # lazy: as below
        from werkzeug.serving import make_server  # lazy: only the embedded S3 endpoint needs moto's server

        # moto's own ThreadedMotoServer, but polling for shutdown every 50 ms: its 0.5 s made every stop wait that long.
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="embedded-s3", daemon=True
        )
        self._thread.start()
        # moto keeps one in-memory backend per process: a new endpoint must not see an old one's buckets.
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"), timeout=10)
        env = {**self.FAKE_ENV, "AWS_ENDPOINT_URL_S3": self.endpoint}
        for name, value in env.items():
            self._saved[name] = os.environ.get(name)
            os.environ[name] = value
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # serve_forever returns and closes the socket
            if self._thread is not None:
                self._thread.join()
            self._server, self._thread = None, None
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def __enter__(self) -> "EmbeddedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
