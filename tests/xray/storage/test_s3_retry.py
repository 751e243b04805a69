"""S3 failures over real HTTP: a proxy in front of moto answers with the errors S3 sends.

Transient ones (503 SlowDown) are retried; permanent ones (403 AccessDenied, a bad key id, a bad
signature) fail at once with one line naming the URI.
"""

import http.client
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from xray.config.s3 import S3Config
from xray.errors import DatasetSourceError
from xray.storage import s3
from xray.storage.fetch import fetch


class FlakyProxy:
    """Answers the first ``failures`` requests with an S3 error (503 SlowDown by default), then forwards to moto."""

    def __init__(self, upstream_port: int, failures: int, status: int = 503, code: str = "SlowDown"):
        self.failures, self.seen, self.status, self.code = failures, 0, status, code
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                proxy.seen += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.seen <= proxy.failures:
                    error = f"<Error><Code>{proxy.code}</Code><Message>refused</Message></Error>".encode()
                    self.send_response(proxy.status)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                upstream.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                response = upstream.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_HEAD = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def moto_with_object(tmp_path):
    with s3.EmbeddedS3() as moto:
        source = tmp_path / "a.zip"
        source.write_bytes(b"archive bytes" * 1000)
        s3.upload_if_missing(s3.make_client(1), source, s3.S3Location("bucket", "a.zip"))
        yield moto


def _behind_proxy(moto, **kwargs) -> FlakyProxy:
    proxy = FlakyProxy(moto.port, **kwargs)
    os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint  # EmbeddedS3 restores it on exit
    return proxy


@pytest.fixture
def flaky(moto_with_object):
    proxy = _behind_proxy(moto_with_object, failures=2)
    yield proxy
    proxy.close()


def test_throttling_is_retried_with_backoff(flaky, tmp_path):
    archive = fetch("s3://bucket/a.zip", tmp_path / "w", S3Config(max_attempts=5))
    assert archive.size == 13000
    assert flaky.seen == 3  # two 503s, then the real answer


def test_without_retries_the_error_is_one_line(flaky, tmp_path):
    with pytest.raises(DatasetSourceError) as error:
        fetch("s3://bucket/a.zip", tmp_path / "w", S3Config(max_attempts=1))
    assert str(error.value) == "cannot read s3://bucket/a.zip: S3 error SlowDown (HTTP 503)"


@pytest.mark.parametrize(
    "status, code, reason",
    [
        (403, "AccessDenied", "access denied"),
        (403, "InvalidAccessKeyId", "the AWS access key id is not valid"),
        (403, "SignatureDoesNotMatch", "the AWS secret key does not match the access key"),
    ],
)
def test_permanent_errors_are_not_retried(moto_with_object, tmp_path, status, code, reason):
    proxy = _behind_proxy(moto_with_object, failures=100, status=status, code=code)
    try:
        with pytest.raises(DatasetSourceError) as error:
            fetch("s3://bucket/a.zip", tmp_path / "w", S3Config(max_attempts=5))
        assert str(error.value) == f"cannot read s3://bucket/a.zip: {reason}"
        assert proxy.seen == 1
    finally:
        proxy.close()
