"""The node's Storage SCP (pynetdicom): C-ECHO, and C-STORE into the spool.

An association is accepted only from a calling AE title of ``node.allow`` (pynetdicom rejects the others, "calling AE
title not recognised"); each refusal is logged with the AE title and the address. Every storage class is accepted, so
that a router sending whole studies is not disturbed: the CR and DX classes in every transfer syntax the decode path
reads are kept, the others answered with success and dropped (counted). A kept instance is synced to the spool
before the success status goes back. The statuses (PS3.4 GG.4): 0x0000 success; 0xA700 out of resources (the spool
over ``max_spool_gb`` or its disk full); 0xC000 cannot understand (a truncated or malformed file); 0xA701 a spool
that cannot be written for another reason. The association goes on after a failure."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from xray.config.node import STORAGE_CLASSES, NodeConfig
from xray.serving.node.rules import TRANSFER_SYNTAXES, Unreadable, inspect, kept, not_analysed, uid_keywords
from xray.serving.node.spool import Spool, SpoolFull

logger = logging.getLogger(__name__)

SUCCESS, OUT_OF_RESOURCES, CANNOT_WRITE, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA701, 0xC000
HIGH_PRIORITY = 0x0001


@dataclass
class Receiver:
    """What the SCP does with each C-STORE: ``version()`` is the model version analysing now (an instance it already
    reported is acknowledged and not kept again); ``arrived()`` wakes the analysis."""

    spool: Spool
    config: NodeConfig
    version: Callable[[], str]
    arrived: Callable[[], None] = lambda: None
    counts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    seconds: float = 0.0
    """Wall seconds in C-STORE handlers (inspection, spool), all association threads together."""

    def count(self, name: str) -> None:
        with self.lock:
            self.counts[name] += 1

    def store(self, data: bytes, sop_class_uid: str, priority: int) -> int:
        """The status of one C-STORE of ``data`` (a Part 10 file)."""
        clock = time.perf_counter()
        try:
            return self._store(data, sop_class_uid, priority)
        finally:
            with self.lock:
                self.seconds += time.perf_counter() - clock

    def _store(self, data: bytes, sop_class_uid: str, priority: int) -> int:
        if not kept(sop_class_uid):
            self.count("other_class_dropped")
            return SUCCESS
        try:
            arrival = inspect(data)
        except Unreadable as error:
            self.count("refused_unreadable")
            logger.warning("C-STORE refused (0x%04X): %s", CANNOT_UNDERSTAND, error)
            return CANNOT_UNDERSTAND
        reason = not_analysed(arrival, self.config.rules)
        if reason:
            self.count(f"outside_rules_{reason}")
            return SUCCESS
        if self.spool.done(self.version(), arrival.sop_instance_uid):
            self.count("repeated_already_reported")
            return SUCCESS
        try:
            self.spool.store(data, arrival.study_instance_uid, arrival.sop_instance_uid, priority == HIGH_PRIORITY)
        except SpoolFull as error:
            self.count("refused_out_of_resources")
            logger.error("C-STORE refused (0x%04X, out of resources): %s", OUT_OF_RESOURCES, error)
            return OUT_OF_RESOURCES
        except OSError as error:
            self.count("refused_cannot_write")
            logger.error("C-STORE refused (0x%04X): the spool cannot be written (%s)", CANNOT_WRITE, error.strerror)
            return CANNOT_WRITE
        self.count("stored")
        self.arrived()
        return SUCCESS


def application_entity(config: NodeConfig):
    """The node's AE: the allow list, Verification, every storage class (CR and DX in the decode path's syntaxes)."""
    ae = AE(ae_title=config.ae_title)
    ae.require_calling_aet = list(config.allow)
    ae.require_called_aet = True  # a sender that means another node is told so
    ae.maximum_pdu_size = 256 * 1024
    ae.add_supported_context(Verification)
    kept_classes = set(uid_keywords(STORAGE_CLASSES))
    syntaxes = uid_keywords(TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax not in kept_classes:
            ae.add_supported_context(context.abstract_syntax, context.transfer_syntax)
    for sop_class in sorted(kept_classes):
        ae.add_supported_context(sop_class, syntaxes)
    return ae


def serve(config: NodeConfig, receiver: Receiver):
    """Start the SCP on ``config.host:config.port`` in its own threads; returns the server (``shutdown()`` stops
    it)."""
    allowed = set(config.allow)

    def rejected(event) -> None:
        requestor = event.assoc.requestor
        title = str(requestor.ae_title).strip()
        receiver.count("associations_rejected")
        logger.warning(
            "association from AE %r at %s:%s rejected: %s",
            title,
            requestor.address,
            requestor.port,
            "not in the allow list" if title not in allowed else f"it did not call {config.ae_title}",
        )

    def store(event) -> int:
        return receiver.store(
            event.encoded_dataset(include_meta=True),
            str(event.request.AffectedSOPClassUID),
            int(event.request.Priority or 0),
        )

    def echo(event) -> int:
        receiver.count("echoes")
        return SUCCESS

    handlers = [(evt.EVT_REJECTED, rejected), (evt.EVT_C_STORE, store), (evt.EVT_C_ECHO, echo)]
    server = application_entity(config).start_server((config.host, config.port), block=False, evt_handlers=handlers)
    logger.info("DICOM node %s listening on %s:%d", config.ae_title, config.host, config.port)
    return server
