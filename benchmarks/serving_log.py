"""REST throughput with and without the prediction log, side by side (issue #32: within 5%).

    .venv/bin/python benchmarks/serving_log.py [--model-version champion] [--rounds 6] [--requests 200] [--clients 4]

Serves the same registered version twice with ``mlflow models serve --env-manager local`` (one worker each): once
with ``XRAY_PREDICTION_LOG=off``, once logging to a temporary folder. Rounds of ``--requests`` single-image requests
from ``--clients`` keep-alive clients alternate between the two servers (which goes first alternates too), so both see
the same machine load; the throughput ratio (logging / not) is the median of the rounds' ratios. The logged rows are
read back at the end: every request of the logging server must be in its log. Both servers run this checkout's
``xray`` (copied into the downloaded version's ``code/``), so only the log differs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from inference_at_scale import free_port, load_test, serve  # noqa: E402

from xray.config.registry import MODEL_NAME  # noqa: E402


def descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        for task in Path(f"/proc/{pending.pop()}/task").glob("*/children"):
            children = [int(c) for c in task.read_text().split()]
            found += children
            pending += children
    return found


@click.command()
@click.option("--model-version", default="champion", show_default=True)
@click.option("--model-name", default=MODEL_NAME, show_default=True)
@click.option("--rounds", default=6, show_default=True)
@click.option("--requests", "count", default=200, show_default=True, help="Requests per round and server.")
@click.option("--clients", default=4, show_default=True)
def main(model_version: str, model_name: str, rounds: int, count: int, clients: int) -> None:
    import bench
    import mlflow

    from xray.environment import process_running
    from xray.monitoring.prediction_log import (
        ENVIRONMENT,
        SPOOL_ENVIRONMENT,
        BackgroundLog,
        PredictionLog,
        read_log,
    )
    from xray.registry import store, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    info = store.resolve_version(model_name, model_version)
    work = Path(tempfile.mkdtemp(prefix="xray-serving-log-bench-"))
    try:
        folder = mlflow.artifacts.download_artifacts(artifact_uri=info.uri, dst_path=str(work / "model"))
        # This checkout's serving code in both servers (a version carries the code it was registered with).
        shutil.rmtree(Path(folder) / "code" / "xray")
        shutil.copytree(ROOT / "xray", Path(folder) / "code" / "xray", ignore=shutil.ignore_patterns("__pycache__"))
        spool = work / "spool"
        with zipfile.ZipFile(ROOT.parent / "shared" / "data" / "chest_xray_224.zip") as handle:
            names = sorted(n for n in handle.namelist() if "/test/" in n and n.endswith(".jpeg"))[:50]
            bodies = [json.dumps({"inputs": [base64.b64encode(handle.read(n)).decode()]}).encode() for n in names]
        path = f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"
        logs = work / "prediction_log"
        settings = {"off": "off", "logging": str(logs)}
        servers, ports = {}, {name: free_port() for name in settings}
        try:
            for name, setting in settings.items():
                env = os.environ | {"PATH": path, ENVIRONMENT: setting, SPOOL_ENVIRONMENT: str(spool)}
                servers[name] = serve(folder, env, ports[name], workers=1)
            for name in settings:
                load_test(ports[name], bodies, clients, 20)  # warm-up
            results = {name: [] for name in settings}
            for round_ in range(rounds):
                order = list(settings) if round_ % 2 == 0 else list(settings)[::-1]
                for name in order:
                    result = load_test(ports[name], bodies, clients, count)
                    if result["errors"]:
                        raise click.ClickException(f"{name}: {result['first_errors']}")
                    results[name].append(result["requests_per_s"])
        finally:
            workers = [pid for server in servers.values() for pid in descendants(server.pid)]
            for server in servers.values():
                server.terminate()
                server.wait(timeout=60)
            deadline = time.monotonic() + 60  # `mlflow models serve` runs uvicorn as its child: await it too
            while any(process_running(pid) for pid in workers) and time.monotonic() < deadline:
                time.sleep(0.2)
        # uvicorn ends its worker by re-raising SIGTERM: what the worker had not flushed is in its spool, written by
        # the next log on the same root (here this one, as a restarted server would).
        BackgroundLog(PredictionLog(str(logs), "serving"), spool=spool).close()
        logged = len(read_log(str(logs)))
        expected = 20 + rounds * count
        ratios = np.array(results["logging"]) / np.array(results["off"])
        summary = {
            "ratio_median": float(np.median(ratios)),
            "ratios": [round(float(r), 4) for r in ratios],
            "off_requests_per_s": [round(r, 2) for r in results["off"]],
            "logging_requests_per_s": [round(r, 2) for r in results["logging"]],
            "rows_logged": logged,
            "requests_to_the_logging_server": expected,
            "clients": clients,
            "model": info.uri,
        }
        print(json.dumps(summary, indent=1))
        if logged != expected:
            raise click.ClickException(f"the log holds {logged} rows for {expected} requests")
        bench.record(
            "serving_throughput_with_prediction_log",
            {"value": summary["ratio_median"], "unit": "requests/s logging / not, median of rounds"}
            | {k: v for k, v in summary.items() if k != "ratio_median"},
            ".venv/bin/python benchmarks/serving_log.py " + " ".join(sys.argv[1:]),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
