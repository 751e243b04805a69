"""Transient S3 failures are retried, against a real HTTP proxy in front of moto."""

import http.client
import os
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from xray import s3
from xray.config import S3Config
from xray.errors import DatasetSourceError
from xray.ingest import fetch


class FlakyProxy:
    """Answers the first ``failures`` requests with 503 SlowDown, then forwards to the upstream."""

    def __init__(self, upstream_port: int, failures: int):
        self.failures, self.seen = failures, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                proxy.seen += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.seen <= proxy.failures:
                    error = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
                    self.send_response(503)
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
def flaky(tmp_path):
    with s3.EmbeddedS3() as moto:
        urllib.request.urlopen(urllib.request.Request(f"{moto.endpoint}/moto-api/reset", method="POST"))
        source = tmp_path / "a.zip"
        source.write_bytes(b"archive bytes" * 1000)
        s3.upload_if_missing(s3.make_client(1), source, s3.S3Location("bucket", "a.zip"))
        proxy = FlakyProxy(moto.port, failures=2)
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint  # EmbeddedS3 restores it on exit
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
