"""The DICOM node as a process (``python3 run.py node``, ``make node``): the champion loaded once, checked for a
newer one between studies, the prediction log of the stack, the Storage SCP and the analysis thread
(:class:`xray.serving.node.service.Node`) started, and SIGTERM (or Ctrl-C) answered by finishing the batches in hand."""

from __future__ import annotations

import logging
import os
import signal
import threading

from xray.monitoring import prediction_log
from xray.registry import store
from xray.requests import NodeRequest
from xray.serving.node.service import Node

logger = logging.getLogger(__name__)


def loader(model_name: str, requested: str, runtime: str, decode):
    """The predictor of ``requested`` (a version number or an alias) and the function that returns a newer one: an
    alias is resolved again each time (a version number never moves)."""

    def load_version(version: str):
        predictor, _ = store.load_predictor(model_name, version)
        predictor.use_runtime(runtime)
        predictor.use_limits(decode)
        return predictor

    def newer(current: str):
        if requested.isdigit():
            return None
        version = store.resolve_version(model_name, requested).version
        return None if version == current else load_version(version)

    first = store.resolve_version(model_name, requested).version
    return load_version(first), newer


def log_root(request: NodeRequest) -> str | None:
    root = request.prediction_log or os.environ.get(prediction_log.ENVIRONMENT, "").strip()
    if not root:
        from infra.stacks import prediction_log_root

        root = prediction_log_root()
    return None if root == prediction_log.OFF else root


def serve(config, predictor, model: str, load=None, log=None, ready=lambda: None) -> dict:
    """The node on ``predictor`` until SIGTERM or SIGINT: the batches in hand are finished, the log flushed; its counts."""
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    node = Node(config, predictor, model, load=load, log=log).start()
    ready()
    stop.wait()
    logger.info("stopping: finishing the batches in hand")
    node.stop()
    return node.summary()


def run_node(request: NodeRequest) -> dict:
    """``run.py node``: the champion (or ``--model-version``) and the stack's prediction log, served until SIGTERM."""
    config = request.config
    predictor, newer = loader(
        config.registry.model_name, request.model_version, config.inference.runtime, config.inference.decode
    )
    root = log_root(request)
    log = prediction_log.PredictionLog(root, "node", input_uri=f"dicom://{config.node.ae_title}") if root else None

    def ready() -> None:
        logger.info(
            "node ready: %s v%s (%s) on %s:%d as %s, results to %d destination(s), prediction log %s",
            config.registry.model_name,
            predictor.version,
            predictor.runtime,
            config.node.host,
            config.node.port,
            config.node.ae_title,
            len(config.node.destinations),
            prediction_log.without_credentials(root) if root else "off",
        )

    return serve(config.node, predictor, config.registry.model_name, load=newer, log=log, ready=ready)
