"""A PACS over DICOMweb: QIDO-RS to list, WADO-RS to read, STOW-RS to store (PS3.18).

``dicomweb://HOST:PORT/ROOT?FILTERS`` (``dicomwebs://`` for HTTPS) names a source: every image instance of the studies
that match the QIDO-RS filters (e.g. ``?ModalitiesInStudy=DX&StudyDate=20261101-``), listed page by page (``limit`` /
``offset``), each read with one WADO-RS request in its stored transfer syntax. Instances of non-image SOP classes
(structured reports, presentation states, key objects...) are skipped and counted, never read.

Credentials come from ``XRAY_PACS_USER`` and ``XRAY_PACS_PASSWORD`` (HTTP basic authentication) and go nowhere else:
no message, log line or summary carries them. Requests are retried (connection errors, 502/503/504) with backoff and
time out; a PACS that stays unreachable raises :class:`xray.errors.SourceUnavailable`, which stops a batch (what was
written is kept, and ``--resume`` finishes it) rather than marking every later image unreadable.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from xray.errors import DatasetSourceError, SourceUnavailable

logger = logging.getLogger(__name__)

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
USER_ENV, PASSWORD_ENV = "XRAY_PACS_USER", "XRAY_PACS_PASSWORD"
DEFAULT_USER, DEFAULT_PASSWORD = "xray", "xray-local-pacs"
"""The local PACS's documented defaults (make pacs); a real PACS is given its own in the environment."""
PAGE = 100
DICOM_JSON = "application/dicom+json"
INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# SOP classes that hold no image to read (PS3.4 B.5): structured reports, presentation states, key objects,
# encapsulated documents, raw data, waveforms. Skipped by the listing, not counted as unreadable.
NOT_IMAGES = re.compile(r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.(88|11|104|66|9)\.")
NOT_AN_IMAGE = "not an image (structured report, presentation state, document or waveform)"
_TAG = {"study": "0020000D", "series": "0020000E", "instance": "00080018", "sop_class": "00080016"}


@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb service root and its query, from a ``dicomweb://`` URI."""

    base: str
    """``http://HOST:PORT/ROOT`` (no trailing slash)."""
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


class Client:
    """One DICOMweb service with retries, timeouts and basic authentication; safe to share between threads for
    reading (one requests Session per thread)."""

    def __init__(self, endpoint: Endpoint, max_attempts: int = 5, timeout_s: tuple[float, float] = (5, 60)):
        self.endpoint, self.max_attempts, self.timeout_s = endpoint, max_attempts, timeout_s
        self._auth = (os.environ.get(USER_ENV, DEFAULT_USER), os.environ.get(PASSWORD_ENV, DEFAULT_PASSWORD))
        self._local = threading.local()

    def _session(self):
        if not hasattr(self._local, "session"):
            session = requests.Session()
            session.auth = self._auth
            retry = Retry(
                total=self.max_attempts - 1,
                connect=self.max_attempts - 1,
                read=self.max_attempts - 1,
                status=self.max_attempts - 1,
                backoff_factor=0.5,
                status_forcelist=(502, 503, 504),
                allowed_methods=None,
                raise_on_status=False,
            )
            session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=16))
            session.mount("https://", HTTPAdapter(max_retries=retry, pool_maxsize=16))
            self._local.session = session
        return self._local.session

    def request(self, method: str, path: str, **kwargs):
        """One request under the retry policy; an HTTP error is one line naming the URL (never the credentials)."""
        url = f"{self.endpoint.base}{path}"
        shown = url.split("?")[0]
        try:
            response = self._session().request(method, url, timeout=self.timeout_s, **kwargs)
        except requests.RequestException as error:
            kind = type(error).__name__
            raise SourceUnavailable(
                f"the PACS at {self.endpoint.base} cannot be reached ({kind}, after {self.max_attempts} attempts)"
            ) from None
        if response.status_code in (401, 403):
            raise DatasetSourceError(
                f"the PACS at {self.endpoint.base} refused the credentials (HTTP {response.status_code}): check "
                f"{USER_ENV} and {PASSWORD_ENV}"
            )
        if response.status_code >= 500:
            raise SourceUnavailable(f"the PACS at {self.endpoint.base} answered HTTP {response.status_code} to {shown}")
        return response

    def search(self, path: str, filters: dict | tuple = ()) -> Iterator[dict]:
        """Every result of a QIDO-RS query, page by page."""
        offset = 0
        while True:
            query = [*dict(filters).items(), ("limit", str(PAGE)), ("offset", str(offset))]
            response = self.request("GET", f"{path}?{urlencode(query)}", headers={"Accept": DICOM_JSON})
            if response.status_code == 204:
                return
            if response.status_code != 200:
                raise DatasetSourceError(f"QIDO-RS {self.endpoint.base}{path} answered HTTP {response.status_code}")
            page = response.json()
            yield from page
            if len(page) < PAGE:
                return
            offset += len(page)

    def instances(self, skipped: Counter) -> Iterator[tuple[str, str, str]]:
        """(study, series, instance) UIDs of every image instance of the matching studies, in study order."""
        for study in self.search("/studies", self.endpoint.filters):
            study_uid = _value(study, "study")
            for item in self.search(f"/studies/{study_uid}/instances", {"includefield": "00080016"}):
                if NOT_IMAGES.match(_value(item, "sop_class")):
                    skipped[NOT_AN_IMAGE] += 1
                    continue
                yield study_uid, _value(item, "series"), _value(item, "instance")

    def retrieve(self, study: str, series: str, instance: str) -> bytes:
        """One instance's Part 10 bytes over WADO-RS, in the transfer syntax it is stored in."""
        path = f"/studies/{study}/series/{series}/instances/{instance}"
        response = self.request("GET", path, headers={"Accept": INSTANCE_ACCEPT})
        if response.status_code == 404:
            raise DatasetSourceError(f"instance {instance} is no longer in the PACS")
        if response.status_code != 200:
            raise DatasetSourceError(f"WADO-RS answered HTTP {response.status_code} for instance {instance}")
        parts = multipart_parts(response.content, response.headers.get("Content-Type", ""))
        if len(parts) != 1:
            raise DatasetSourceError(f"WADO-RS sent {len(parts)} parts for instance {instance}, expected 1")
        return parts[0]

    def metadata(self, study: str, series: str, instance: str) -> dict:
        """One instance's header as DICOM JSON (WADO-RS metadata)."""
        path = f"/studies/{study}/series/{series}/instances/{instance}/metadata"
        response = self.request("GET", path, headers={"Accept": DICOM_JSON})
        if response.status_code != 200:
            raise DatasetSourceError(f"WADO-RS metadata answered HTTP {response.status_code} for {instance}")
        return response.json()[0]

    def exists(self, study: str, series: str, instance: str) -> bool:
        path = f"/studies/{study}/series/{series}/instances/{instance}/metadata"
        return self.request("GET", path, headers={"Accept": DICOM_JSON}).status_code == 200

    def store(self, datasets: list[bytes], study: str | None = None) -> None:
        """STOW-RS of Part 10 files (into ``study`` when given); a refused instance is an error naming its count."""
        boundary = "xray-stow-boundary-7d3f"
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                for data in datasets
            )
            + f"--{boundary}--\r\n".encode()
        )
        path = f"/studies/{study}" if study else "/studies"
        response = self.request(
            "POST",
            path,
            data=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": DICOM_JSON,
            },
        )
        if response.status_code not in (200, 202):
            raise DatasetSourceError(f"STOW-RS refused {len(datasets)} instance(s): HTTP {response.status_code}")
        failed = response.json().get("00081198", {}).get("Value", []) if response.content else []
        if failed:
            raise DatasetSourceError(f"STOW-RS refused {len(failed)} of {len(datasets)} instance(s)")


def _value(item: dict, name: str) -> str:
    values = item.get(_TAG[name], {}).get("Value", [])
    return str(values[0]) if values else ""


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a multipart/related message (RFC 2046), without their part headers."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise DatasetSourceError(f"expected a multipart answer, got {content_type or 'no content type'}")
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            continue
        parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts


def refs(source: str, max_attempts: int, skipped: Counter, make_ref: Callable) -> Iterator:
    """The listing's :class:`xray.storage.listing.ImageRef` of every image instance of a ``dicomweb://`` source."""
    endpoint = parse(source)
    client = Client(endpoint, max_attempts)
    for study, series, instance in client.instances(skipped):

        def read(study=study, series=series, instance=instance) -> bytes:
            return client.retrieve(study, series, instance)

        yield make_ref(endpoint.instance_uri(study, series, instance), read)
