"""The audit trail: every decision on the model, append-only and tamper-evident.

One JSON object per record, ``record-<seq>.json`` under the trail's root (on the stack's artifact store: a local
folder, or an S3 prefix on the team stack), so an append writes one new object and rewrites none; ``head.json``
names the last record (its number and hash). A record holds ``seq``, ``at`` (UTC), ``who`` (the signed-in MLflow
account on the team stack, else the name given), ``what`` (one of :data:`KINDS`), ``why``, ``details`` (names,
versions, digests, decisions: never an image, a path of one or a DICOM value), ``previous`` (the hash of the record
before it) and ``hash`` (SHA-256 of its own canonical JSON without ``hash``). :meth:`Trail.verify` recomputes the
chain and names the first record that breaks it: edited (its hash), deleted (a gap, or fewer records than the
head names), reordered or moved (a number that is not its place, a ``previous`` that is not the record before).

Writers call :func:`append` (or :meth:`Trail.append`); what each writer records:

- training: ``plan version`` (the first run under a plan version), ``gate decision``, ``registration``;
- ``run.py approve | reject | rollback``: ``approval``, ``rejection``, ``rollback``;
- ``run.py audit approve-plan``: ``plan approval`` (the reviewer account);
- batch inference with ``--write-back``: ``write-back batch`` (counts, never UIDs);
- the node (a site's inference box) at start: ``node start`` with its configuration (versions, settings; no
  patient data): ``append(trail, "node start", who, why, {...})``.

Appends are not serialised across machines: two written at once take the same number, and verify names it.
"""

from __future__ import annotations

import getpass
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from xray.registry import tracking

KINDS = (
    "plan version",
    "plan approval",
    "gate decision",
    "registration",
    "approval",
    "rejection",
    "rollback",
    "operating point",
    "write-back batch",
    "node start",
)
GENESIS = "0" * 64
HEAD = "head.json"
PREFIX = "record-"


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(record: dict) -> str:
    """SHA-256 of the record's canonical JSON without its own ``hash``."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def record_name(seq: int) -> str:
    return f"{PREFIX}{seq:08d}.json"


class FolderFiles:
    """A trail in a local folder (the local stack's artifact store, tests); the team stack's goes through ZenML's
    artifact store (steps/logstore.py). Same four methods: write, list (record names, sorted), read, uri."""

    def __init__(self, root):
        self.root = Path(root).expanduser()

    def write(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.root / f".{name}.partial"
        partial.write_bytes(data)
        partial.replace(self.root / name)

    def list(self) -> list[str]:
        return sorted(p.name for p in self.root.glob(f"{PREFIX}*.json")) if self.root.is_dir() else []

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def uri(self, name: str) -> str:
        return (self.root / name).resolve().as_uri()


@dataclass
class Verification:
    """What :meth:`Trail.verify` found: ``broken`` names the first record that breaks the chain (None: intact)."""

    records: int
    broken: str | None = None
    why: str = ""
    head: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.broken is None


class Trail:
    def __init__(self, files):
        self.files = files

    def _head(self) -> dict | None:
        if not self.files.exists(HEAD):
            return None
        return json.loads(self.files.read(HEAD))

    def append(self, what: str, who: str, why: str, details: dict | None = None, now: datetime | None = None) -> dict:
        """A new record after the last one (its hash as ``previous``), then the head. Refuses an unknown kind, no
        ``who`` or no ``why``, and details that are not plain JSON."""
        if what not in KINDS:
            raise ValueError(f"audit record kind {what!r} is not one of {', '.join(KINDS)}")
        if not str(who).strip() or not str(why).strip():
            raise ValueError("an audit record needs who and why")
        details = json.loads(json.dumps(details or {}, allow_nan=False))
        head = self._head()
        if head is None and self.files.list():
            raise ValueError(f"the audit trail has records but no {HEAD}: run audit verify")
        seq, previous = (head["seq"] + 1, head["hash"]) if head else (1, GENESIS)
        stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        record = {
            "seq": seq,
            "at": stamp,
            "who": str(who).strip()[:200],
            "what": what,
            "why": str(why).strip()[:4000],
            "details": details,
            "previous": previous,
        }
        record["hash"] = record_hash(record)
        self.files.write(record_name(seq), canonical(record))
        self.files.write(HEAD, canonical({"seq": seq, "hash": record["hash"]}))
        return record

    def records(self) -> list[dict]:
        """Every record as stored, in name order (verify says whether they hold together)."""
        found = []
        for name in self.files.list():
            try:
                found.append(json.loads(self.files.read(name)) | {"file": self.files.uri(name)})
            except ValueError:
                found.append({"file": self.files.uri(name), "unreadable": True})
        return found

    def verify(self) -> Verification:
        """The chain recomputed from the first record: each in its place (``seq`` = its position and its name), its
        hash its content's, its ``previous`` the record before's hash; the head names the last. The first break
        found is named."""
        names, previous = self.files.list(), GENESIS
        head = self._head() or {}
        for position, name in enumerate(names, start=1):
            if name != record_name(position):
                return Verification(position - 1, f"record {position}", f"missing (deleted): next is {name}", head)
            try:
                record = json.loads(self.files.read(name))
            except ValueError:
                return Verification(position - 1, f"record {position}", f"{name} is not JSON (edited)", head)
            if record.get("seq") != position:
                return Verification(
                    position - 1, f"record {position}", f"{name} holds record {record.get('seq')} (reordered)", head
                )
            if record_hash(record) != record.get("hash"):
                return Verification(
                    position - 1, f"record {position}", "its content does not match its hash (edited)", head
                )
            if record.get("previous") != previous:
                return Verification(
                    position - 1,
                    f"record {position}",
                    f"its previous hash {str(record.get('previous'))[:12]} is not record {position - 1}'s "
                    f"{previous[:12]} (record {position - 1} replaced, or the records reordered)",
                    head,
                )
            previous = record["hash"]
        count = len(names)
        if not head and count:
            return Verification(count, f"record {count}", f"{HEAD} is missing (deleted)", head)
        if head and (head.get("seq") != count or head.get("hash") != previous):
            if isinstance(head.get("seq"), int) and head["seq"] > count:
                return Verification(
                    count, f"record {count + 1}", f"missing (deleted): the head names record {head['seq']}", head
                )
            return Verification(
                count, f"record {count}", f"{HEAD} names record {head.get('seq')} with another hash", head
            )
        return Verification(count, None, "", head)

    def approved_plans(self) -> set[str]:
        """The plan digests a reviewer approved (``plan approval`` records)."""
        return {r["details"].get("plan_digest") for r in self.records() if r.get("what") == "plan approval"}

    def has_plan(self, digest: str) -> bool:
        return any(
            r.get("what") == "plan version" and r["details"].get("plan_digest") == digest for r in self.records()
        )


def append(trail: Trail, what: str, who: str, why: str, details: dict | None = None) -> dict:
    """Append one record to ``trail`` (the hook for writers outside the training and decision paths: a write-back
    batch, the node's configuration at start). Returns the record as written."""
    return trail.append(what, who, why, details)


def account(tracking_uri: str | None, named: str | None = None) -> str:
    """Who a record names: the signed-in MLflow account on a tracking server with accounts (the team stack's trainer
    or reviewer), else ``named``, else this machine's user, marked as such."""
    signed_in = tracking.authenticated_user(tracking_uri) if tracking_uri else None
    return signed_in or named or f"{getpass.getuser()} (local user, no MLflow account)"
