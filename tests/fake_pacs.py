"""A DICOMweb server in this process, on 127.0.0.1, for the PACS cases that a real Orthanc cannot play: a PACS that
drips, pages without end, sends gigabytes, lies about UIDs, redirects elsewhere or answers broken JSON.

``FakePacs(instances)`` answers QIDO-RS (``/studies``, ``/studies/{uid}/instances``, paged with ``limit``/``offset``)
and WADO-RS (one instance as multipart/related) for ``instances`` ({(study, series, sop): Part 10 bytes}). A test
changes one answer by setting ``pacs.override`` to ``(path, query) -> answer or None``; an answer is ``(status,
headers, body)`` where ``body`` is bytes or an iterator of chunks (streamed, the connection closed at its end).
``pacs.requests`` lists every ``(method, path with query)`` received. The server stops when the context ends.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

ROOT = "/dicom-web"
IMAGE_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
BOUNDARY = "fake-pacs-boundary"


def attribute(tag: str, value: str, vr: str = "UI") -> dict:
    return {tag: {"vr": vr, "Value": [value]}}


def json_answer(items) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/dicom+json"}, json.dumps(items).encode()


def multipart(data: bytes) -> tuple[int, dict, bytes]:
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    return 200, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}, body


def drip(chunk: bytes, every_s: float, times: int) -> Iterator[bytes]:
    """``chunk`` every ``every_s`` seconds, ``times`` times: each read returns well inside any read timeout."""
    for _ in range(times):
        yield chunk
        time.sleep(every_s)


class FakePacs:
    def __init__(self, instances: dict[tuple[str, str, str], bytes] | None = None):
        self.instances = dict(instances or {})
        self.override: Callable[[str, dict], tuple | None] | None = None
        self.requests: list[tuple[str, str]] = []
        self.url = ""
        """``dicomweb://127.0.0.1:PORT/dicom-web``, once started."""
        self.http = ""
        """``http://127.0.0.1:PORT``, once started."""

    def answer(self, path: str, query: dict) -> tuple:
        if self.override is not None and (custom := self.override(path, query)) is not None:
            return custom
        parts = path.removeprefix(ROOT).strip("/").split("/")
        offset, limit = int(query.get("offset", 0)), int(query.get("limit", 1000))
        if parts == ["studies"]:
            studies = sorted({study for study, _, _ in self.instances})
            return json_answer([attribute("0020000D", uid) for uid in studies[offset : offset + limit]])
        if len(parts) == 3 and parts[0] == "studies" and parts[2] == "instances":
            found = sorted(key for key in self.instances if key[0] == parts[1])
            return json_answer(
                [
                    attribute("0020000E", series) | attribute("00080018", sop) | attribute("00080016", IMAGE_CLASS)
                    for _, series, sop in found[offset : offset + limit]
                ]
            )
        if len(parts) == 6 and parts[0] == "studies" and parts[2] == "series" and parts[4] == "instances":
            data = self.instances.get((parts[1], parts[3], parts[5]))
            return multipart(data) if data is not None else (404, {}, b"")
        return 404, {}, b""

    @contextmanager
    def running(self):
        pacs = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                pacs.requests.append(("GET", self.path))
                split = urlsplit(self.path)
                status, headers, body = pacs.answer(split.path, dict(parse_qsl(split.query)))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for chunk in body:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except OSError:  # the client stopped reading: what a bounded client does
                    pass
                self.close_connection = True

            def log_message(self, *args):  # quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-pacs", daemon=True)
        thread.start()
        port = server.server_address[1]
        self.http, self.url = f"http://127.0.0.1:{port}", f"dicomweb://127.0.0.1:{port}{ROOT}"
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
