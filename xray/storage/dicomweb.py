"""A PACS over DICOMweb: QIDO-RS to list, WADO-RS to read, STOW-RS to store (PS3.18).

``dicomweb://HOST:PORT/ROOT?FILTERS`` (``dicomwebs://`` for HTTPS) names a source: every image instance of the studies
that match the QIDO-RS filters (e.g. ``?ModalitiesInStudy=DX&StudyDate=20261101-``), listed page by page (``limit`` /
``offset``), each read with one WADO-RS request in its stored transfer syntax. Instances of non-image SOP classes
(structured reports, presentation states, key objects...) are skipped and counted, never read.

Credentials come from ``XRAY_PACS_USER`` and ``XRAY_PACS_PASSWORD`` (HTTP basic authentication) and go nowhere else:
no message, log line or summary carries them. Requests are retried (connection errors, 502/503/504) with backoff and
time out; a PACS that stays unreachable raises :class:`xray.errors.SourceUnavailable`, which stops a batch (what was
written is kept, and ``--resume`` finishes it) rather than marking every later image unreadable.

Nothing a PACS sends is trusted (``inference.pacs``, :class:`xray.config.limits.PacsLimits`): answers are streamed
under byte caps and end within a deadline (retries included; a watchdog shuts the socket of a PACS that drips),
queries stop at ``max_pages`` and sources at ``max_studies``, a UID enters a URL only when it is one (PS3.5 9.1), a
redirect is followed only within the configured origin, and an answer that is not DICOM JSON is one error naming the
URL. The protocol is dicomweb-client's; these limits are its session's (:class:`_Bounded`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urljoin, urlparse

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from xray.config.limits import PacsLimits
from xray.errors import DatasetSourceError, SourceUnavailable

logger = logging.getLogger(__name__)
# dicomweb-client logs each URL with its query at DEBUG (a QIDO-RS filter may name a patient) and a PACS's Warning
# header at WARNING, urllib3 each request line with its query at DEBUG: none reaches the logs, whoever set DEBUG.
logging.getLogger("dicomweb_client").setLevel(logging.ERROR)


def _without_query(record: logging.LogRecord) -> bool:
    record.msg, record.args = re.sub(r"\?[^\s\"]*", "?<query>", record.getMessage()), ()
    return True


logging.getLogger("urllib3.connectionpool").addFilter(_without_query)

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
USER_ENV, PASSWORD_ENV = "XRAY_PACS_USER", "XRAY_PACS_PASSWORD"
DEFAULT_USER, DEFAULT_PASSWORD = "xray", "xray-local-pacs"  # the local PACS's documented ones (make pacs)
PAGE = 100
# Retried with backoff: connection errors, 502, 503, 504; no Retry-After (an hour's would sleep past any deadline).
RETRY = {"backoff_factor": 0.5, "status_forcelist": (502, 503, 504), "allowed_methods": None, "raise_on_status": False}
MAX_REDIRECTS = 5
PART_HEADERS = 64 * 1024  # room for a multipart answer's boundaries and part headers above max_instance_bytes
DICOM_JSON = "application/dicom+json"
INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# SOP classes without an image (PS3.4 B.5: SR, presentation states, key objects, documents, raw data, waveforms):
NOT_IMAGES = re.compile(r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.(88|11|104|66|9)\.")
NOT_AN_IMAGE = "not an image (structured report, presentation state, document or waveform)"
INVALID_UID = "listed with a UID that is not one (PS3.5 9.1), not read"
_TAG = {"study": "0020000D", "series": "0020000E", "instance": "00080018", "sop_class": "00080016"}
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_uid(value) -> bool:
    """A DICOM UID (PS3.5 9.1): numeric components without leading zeros, separated by dots, 64 characters at most."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb service root and its query, from a ``dicomweb://`` URI."""

    base: str  # http://HOST:PORT/ROOT, no trailing slash
    filters: tuple[tuple[str, str], ...] = ()

    @property
    def uri(self) -> str:
        """The source as the user named it, without credentials (a URI may not carry any)."""
        parsed = urlparse(self.base)
        scheme = "dicomwebs" if parsed.scheme == "https" else "dicomweb"
        query = f"?{urlencode(self.filters)}" if self.filters else ""
        return f"{scheme}://{parsed.netloc}{parsed.path}{query}"

    def instance_uri(self, study: str, series: str, instance: str) -> str:
        return f"{self.uri.split('?')[0]}/studies/{study}/series/{series}/instances/{instance}"


def _origin(url: str) -> tuple | None:
    """(scheme, host, port) of a URL; None when its port is not a number."""
    parsed = urlparse(url)
    try:
        return parsed.scheme, parsed.hostname or "", parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    except ValueError:
        return None


def is_dicomweb(source: str) -> bool:
    return urlparse(source).scheme in SCHEMES


def parse(source: str) -> Endpoint:
    parsed = urlparse(source)
    if parsed.scheme not in SCHEMES or not parsed.hostname:
        raise DatasetSourceError(f"not a dicomweb://HOST:PORT/ROOT URI: {source}")
    if parsed.username or parsed.password:
        raise DatasetSourceError(
            f"credentials do not belong in the URI; set {USER_ENV} and {PASSWORD_ENV} instead "
            f"(dicomweb://{parsed.hostname}:{parsed.port or ''}{parsed.path})"
        )
    root = parsed.path.rstrip("/")
    return Endpoint(f"{SCHEMES[parsed.scheme]}://{parsed.netloc}{root}", tuple(parse_qsl(parsed.query)))


_current = threading.local()  # the deadline of the request this thread is making


class _Deadline:
    """The end of one request (retries included): at ``seconds``, the socket carrying it is shut down (a blocked read
    returns at once) and any further attempt refuses to start."""

    def __init__(self, seconds: float):
        self.expired, self.sock, self._lock = False, None, threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)

    def attach(self, sock) -> None:
        with self._lock:
            if self.expired:
                raise TimeoutError("the request's deadline has passed")
            self.sock = sock or self.sock

    def _expire(self) -> None:
        with self._lock:
            self.expired, sock = True, self.sock
        with contextlib.suppress(OSError, AttributeError):  # already closed, or never connected
            sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        _current.deadline, self._timer.daemon = self, True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        _current.deadline = None


class _Watched:
    """A connection that hands its socket (not itself: http.client passes the socket on to the response) to the
    deadline of the request it carries, this thread's."""

    def connect(self):
        super().connect()
        self._watched()

    def request(self, *args, **kwargs):
        self._watched()
        return super().request(*args, **kwargs)

    def _watched(self) -> None:
        if (deadline := getattr(_current, "deadline", None)) is not None:
            deadline.attach(self.sock)


class _Adapter(HTTPAdapter):
    """requests' adapter, its pools making :class:`_Watched` connections."""

    POOLS = {
        "http": type("Pool", (HTTPConnectionPool,), {"ConnectionCls": type("C", (_Watched, HTTPConnection), {})}),
        "https": type("Pool", (HTTPSConnectionPool,), {"ConnectionCls": type("C", (_Watched, HTTPSConnection), {})}),
    }

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self.POOLS


class _Bounded(requests.Session):
    """The session of every request to the PACS (dicomweb-client's, :meth:`Client.retrieve`'s), under the retries and
    limits of ``client``: the body streamed under ``cap`` bytes (``max_response_bytes``) within ``deadline_s``,
    redirects only within the configured origin, DICOM JSON checked before anyone parses it, each failure one line
    naming the URL (never its query or the credentials). The response comes back read, for the library to decode."""

    def __init__(self, client: Client):
        super().__init__()
        self.client, self.auth = client, client._auth
        n = client.max_attempts - 1
        retry = Retry(total=n, connect=n, read=n, status=n, respect_retry_after_header=False, **RETRY)
        self.mount("http://", _Adapter(max_retries=retry, pool_maxsize=16))
        self.mount("https://", _Adapter(max_retries=retry, pool_maxsize=16))

    def request(self, method: str, url: str, *args, cap: int | None = None, **kwargs) -> requests.Response:
        client, cap = self.client, cap or self.client.limits.max_response_bytes
        # Ours, whatever the caller asked: the timeouts, no redirect followed by requests, the body streamed. The
        # library's Host header (without the port) is left to requests.
        for name in ("timeout", "allow_redirects", "stream"):
            kwargs.pop(name, None)
        headers = {k: v for k, v in (kwargs.pop("headers", None) or {}).items() if k.lower() != "host"}
        with _Deadline(client.limits.deadline_s) as deadline:
            for _ in range(MAX_REDIRECTS + 1):
                shown = url.split("?")[0]
                try:
                    ours = {"headers": headers, "timeout": client.timeout_s, "allow_redirects": False, "stream": True}
                    response = super().request(method, url, *args, **ours, **kwargs)
                    with response:
                        if response.is_redirect:
                            url = client._redirect(method, response, shown)
                            continue
                        client._check_status(response.status_code, shown)
                        response._content, response._content_consumed = _read(response, cap, shown), True
                except requests.RequestException as error:
                    if deadline.expired:
                        break
                    raise SourceUnavailable(
                        f"the PACS at {client.endpoint.base} cannot be reached ({type(error).__name__}, after "
                        f"{client.max_attempts} attempts)"
                    ) from None
                if deadline.expired:
                    break
                answered = response.headers.get("Content-Type", "") if method == "POST" else headers.get("Accept", "")
                if response.status_code in (200, 202) and "json" in answered:  # what QIDO, metadata, STOW answer
                    _dicom_json(response.content, shown, list if method == "GET" else dict)
                return response
            else:
                raise DatasetSourceError(f"the PACS redirected {shown} more than {MAX_REDIRECTS} times")
        raise DatasetSourceError(
            f"the PACS did not finish answering {shown} within {client.limits.deadline_s:g} s (inference.pacs.deadline_s)"
        )


class Client:
    """One DICOMweb service with retries, timeouts, limits and basic authentication; safe to share between threads
    for reading (one session per thread). QIDO-RS, WADO-RS metadata and STOW-RS are dicomweb-client's
    (:class:`dicomweb_client.DICOMwebClient`) over a :class:`_Bounded` session; an instance is read by hand over the
    same session (:meth:`retrieve`: the library would parse the PACS's bytes with pydicom outside the decode limits,
    and hand back a dataset, not the bytes as stored)."""

    def __init__(
        self,
        endpoint: Endpoint,
        max_attempts: int = 5,
        timeout_s: tuple[float, float] = (5, 60),
        limits: PacsLimits | None = None,
    ):
        self.endpoint, self.max_attempts, self.timeout_s = endpoint, max_attempts, timeout_s
        self.limits = limits or PacsLimits()
        self._auth = (os.environ.get(USER_ENV, DEFAULT_USER), os.environ.get(PASSWORD_ENV, DEFAULT_PASSWORD))
        self._local = threading.local()

    def _session(self) -> _Bounded:
        """This thread's session, and dicomweb-client on it (``_local.library``): the library's own retries off (the
        session's, within the deadline) and every body sent whole (a chunked one could not be sent again by a retry)."""
        if not hasattr(self._local, "session"):
            self._local.session = _Bounded(self)
            self._local.library = DICOMwebClient(self.endpoint.base, session=self._local.session, chunk_size=2**62)
            self._local.library.set_http_retry_params(retry=False)
        return self._local.session

    def _call(self, what: str, call: Callable[[DICOMwebClient], object]):
        """``call`` of the library; an HTTP status it refuses (not 401, 403, 5xx: the session's) one line naming ``what``."""
        try:
            return call(self._session() and self._local.library)
        except requests.HTTPError as error:
            raise DatasetSourceError(f"{what} answered HTTP {error.response.status_code}") from None

    def _check_status(self, status: int, shown: str) -> None:
        if status in (401, 403):
            raise DatasetSourceError(
                f"the PACS at {self.endpoint.base} refused the credentials (HTTP {status}): check {USER_ENV} and "
                f"{PASSWORD_ENV}"
            )
        if status >= 500:
            raise SourceUnavailable(f"the PACS at {self.endpoint.base} answered HTTP {status} to {shown}")

    def _redirect(self, method: str, response, shown: str) -> str:
        """Where a read's redirect leads, when it stays on the configured origin (scheme, host and port): the
        credentials and the patients' images go nowhere else."""
        target = urljoin(response.url, response.headers.get("Location", ""))
        if (origin := _origin(target)) != _origin(self.endpoint.base) or method != "GET":
            where = "{}://{}:{}".format(*origin) if origin and origin[1] else "an invalid address"
            raise DatasetSourceError(
                f"the PACS redirected {shown} to {where}: not followed (only redirects within {self.endpoint.base} are)"
            )
        return target

    def search(self, study: str | None = None, filters: dict | tuple = (), fields: tuple = ()) -> Iterator[dict]:
        """Every result of a QIDO-RS query, page by page, ``max_pages`` pages at most: the studies matching
        ``filters``, or the instances of ``study``."""
        where = f"{self.endpoint.base}{self._path(study) if study else ''}/{'instances' if study else 'studies'}"
        offset, fields = 0, list(fields) or None

        def page(library: DICOMwebClient) -> list[dict]:
            asked = {"limit": PAGE, "offset": offset, "fields": fields, "search_filters": dict(filters) or None}
            if study is None:
                return library.search_for_studies(**asked)
            return library.search_for_instances(study_instance_uid=study, **asked)

        for _ in range(self.limits.max_pages):
            found = self._call(f"QIDO-RS {where}", page)
            yield from found
            if len(found) < PAGE:
                return
            offset += len(found)
        raise DatasetSourceError(
            f"QIDO-RS {where} filled {self.limits.max_pages} pages of {PAGE} results and may hold more "
            "(inference.pacs.max_pages): narrow the query with filters, or raise the limit"
        )

    def instances(self, skipped: Counter) -> Iterator[tuple[str, str, str]]:
        """(study, series, instance) UIDs of every image instance of the matching studies, in study order; the
        studies are listed first, ``max_studies`` at most."""
        studies: dict[str, None] = {}
        for study in self.search(filters=self.endpoint.filters):
            uid = _value(study, "study")
            if not is_uid(uid):
                skipped[INVALID_UID] += 1
                continue
            studies[uid] = None
            if len(studies) > self.limits.max_studies:
                raise DatasetSourceError(
                    f"more than {self.limits.max_studies} studies match {self.endpoint.uri.split('?')[0]} "
                    "(inference.pacs.max_studies): narrow the query with filters (StudyDate=...), or raise the limit"
                )
        for study_uid in studies:
            for item in self.search(study_uid, fields=("00080016",)):
                if NOT_IMAGES.match(_value(item, "sop_class")):
                    skipped[NOT_AN_IMAGE] += 1
                elif is_uid(series := _value(item, "series")) and is_uid(instance := _value(item, "instance")):
                    yield study_uid, series, instance
                else:
                    skipped[INVALID_UID] += 1

    def _path(self, study: str, series: str | None = None, instance: str | None = None) -> str:
        uids = [uid for uid in (study, series, instance) if uid is not None]
        if not all(is_uid(uid) for uid in uids):
            raise DatasetSourceError("a UID that is not one (PS3.5 9.1) does not go into a PACS URL")
        names = ("studies", "series", "instances")
        return "".join(f"/{name}/{uid}" for name, uid in zip(names, uids))

    def retrieve(self, study: str, series: str, instance: str) -> bytes:
        """One instance's Part 10 bytes over WADO-RS, in the transfer syntax it is stored in."""
        url, cap = (
            self.endpoint.base + self._path(study, series, instance),
            self.limits.max_instance_bytes + PART_HEADERS,
        )
        answer = self._session().request("GET", url, cap=cap, headers={"Accept": INSTANCE_ACCEPT})
        if answer.status_code == 404:
            raise DatasetSourceError(f"instance {instance} is no longer in the PACS")
        if answer.status_code != 200:
            raise DatasetSourceError(f"WADO-RS answered HTTP {answer.status_code} for instance {instance}")
        parts = multipart_parts(answer.content, answer.headers.get("Content-Type", ""))
        if len(parts) != 1:
            raise DatasetSourceError(f"WADO-RS sent {len(parts)} parts for instance {instance}, expected 1")
        if len(parts[0]) > self.limits.max_instance_bytes:
            raise DatasetSourceError(f"instance {instance} is over inference.pacs.max_instance_bytes")
        return parts[0]

    def metadata(self, study: str, series: str, instance: str) -> dict:
        """One instance's header as DICOM JSON (WADO-RS metadata)."""
        uids = self._path(study, series, instance) and (study, series, instance)
        try:
            return self._call(f"WADO-RS metadata of {instance}", lambda c: c.retrieve_instance_metadata(*uids))
        except IndexError:  # an empty list
            raise DatasetSourceError(f"the PACS answered the metadata of {instance} with none") from None

    def exists(self, study: str, series: str, instance: str) -> bool:
        """Whether the PACS holds the instance (its metadata answered)."""
        self._path(study, series, instance)
        try:
            (self._session() and self._local.library).retrieve_instance_metadata(study, series, instance)
        except (requests.HTTPError, IndexError):
            return False
        return True

    def store(self, datasets: list[bytes], study: str | None = None) -> None:
        """STOW-RS of Part 10 files (into ``study`` when given); a refused instance is an error naming its count (the
        session reads the answer's Failed SOP Sequence, whatever media type parameters it comes with)."""
        parsed, what = (
            [pydicom.dcmread(io.BytesIO(data)) for data in datasets],
            f"STOW-RS of {len(datasets)} instance(s)",
        )
        try:
            self._call(
                what, lambda c: c.store_instances(parsed, study_instance_uid=study and self._path(study) and study)
            )
        except (ValueError, KeyError, TypeError):  # an answer pydicom cannot take as a dataset
            raise DatasetSourceError(f"{what}: the PACS answered with an unreadable result") from None


def _dicom_json(content: bytes, shown: str, kind: type) -> None:
    """A DICOM JSON answer, checked before anyone parses it: a list of objects to a GET (PS3.18 F.2), one object with
    no Failed SOP Sequence to a STOW-RS, or empty; else one error line naming the URL."""
    try:
        found = json.loads(content) if content.strip() else kind()
    except (ValueError, RecursionError):
        raise DatasetSourceError(f"the PACS answered {shown} with malformed JSON") from None
    if not isinstance(found, kind) or (kind is list and not all(isinstance(item, dict) for item in found)):
        what = "a list holding something else" if isinstance(found, list) else type(found).__name__
        raise DatasetSourceError(f"the PACS answered {shown} with {what}, not the DICOM JSON asked for")
    if kind is dict and isinstance(failed := found.get("00081198"), dict) and failed.get("Value"):
        raise DatasetSourceError(f"STOW-RS refused {len(failed['Value'])} instance(s)")


def _read(response, cap: int, shown: str) -> bytes:
    """The body, streamed, refused past ``cap`` bytes (as sent, and as decoded)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > cap:
        raise DatasetSourceError(f"the PACS answered {shown} with {declared} bytes, over the limit of {cap}")
    chunks, size = [], 0
    for chunk in response.iter_content(1024 * 1024):
        size += len(chunk)
        if size > cap:
            raise DatasetSourceError(f"the PACS answered {shown} with more than {cap} bytes, over the limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _value(item: dict, name: str) -> str:
    """A DICOM JSON attribute's first value as text; empty when it is absent or not text."""
    attribute = item.get(_TAG[name]) if isinstance(item, dict) else None
    values = attribute.get("Value") if isinstance(attribute, dict) else None
    return values[0] if isinstance(values, list) and values and isinstance(values[0], str) else ""


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a multipart/related message (RFC 2046), without their part headers."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise DatasetSourceError(f"expected a multipart answer, got {content_type[:80] or 'no content type'}")
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _, separator, content = chunk.partition(b"\r\n\r\n")
        if separator:
            parts.append(content.removesuffix(b"\r\n"))
    return parts
