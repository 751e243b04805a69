"""The node on a tiny model, as a process a test can kill: ``python tests/node_process.py CONFIG_JSON LOG_ROOT``.

The same :class:`xray.serving.node.service.Node` and SIGTERM handling as ``run.py node`` (infra/node.py), on a model
of conftest's explainable predictor's shape instead of a registered champion (no MLflow store to train first). Prints
``ready`` once listening, and the node's summary as one JSON line when stopped. ``XRAY_TEST_PAUSE_BEFORE_DONE``
(seconds) holds each done mark back: the window a test kills the node in."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

# Run as a script, Python puts tests/ first on sys.path, where tests/xray/ (the domain's tests) would stand in for the
# package: the repository's own packages come first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xray.environment import apply_defaults  # noqa: E402

apply_defaults()
PAUSE_BEFORE_DONE = "XRAY_TEST_PAUSE_BEFORE_DONE"
"""Seconds each done mark waits, set by a test that kills the node inside the analysis."""


def tiny_predictor():
    import keras

    from xray.serving.predictor import ChestXrayPredictor

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(keras.layers.Rescaling(1 / 255.0)(inputs))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="probability")(pooled))
    return ChestXrayPredictor(model, 0.5, 32, "7")


def main() -> int:
    from infra.node import serve
    from xray.config.node import NodeConfig
    from xray.monitoring.prediction_log import PredictionLog

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get(PAUSE_BEFORE_DONE):  # a test's window to kill the node between the outbox and the done mark
        from xray.serving.node.spool import Spool

        def paused(spool, version, key, mark=Spool.mark_done):
            time.sleep(float(os.environ[PAUSE_BEFORE_DONE]))
            mark(spool, version, key)

        Spool.mark_done = paused
    config = NodeConfig.model_validate(json.loads(sys.argv[1]))
    log = PredictionLog(sys.argv[2], "node")
    summary = serve(
        config, tiny_predictor(), "chest-xray-classifier", log=log, ready=lambda: print("ready", flush=True)
    )
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
