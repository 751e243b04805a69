"""REST latency with and without the per-image out-of-distribution check, side by side (issue #14).

    .venv/bin/python benchmarks/serving_latency.py [--model-version champion] [--requests 300] [--baseline-ref 4434d31]

Serves the same registered model folder twice with ``mlflow models serve --env-manager local``: once as registered
(this code: decode check, out-of-distribution features and scoring against the reference profile, then the model),
once with the serving code of ``--baseline-ref`` (the last commit before out-of-distribution checks) copied into the
folder's ``code/``. Single-image requests with real test JPEGs alternate between the two servers, one at a time,
so both see the same machine load; p50/p95 latency and their ratio are recorded in benchmarks/results.json through
``bench.record`` and printed.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from inference_at_scale import free_port  # noqa: E402
from inference_at_scale import serve as start_server  # noqa: E402

from xray.config.registry import MODEL_NAME  # noqa: E402


def serve(folder: Path, port: int) -> subprocess.Popen:
    env = os.environ | {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"}
    try:
        return start_server(str(folder), env, port, workers=1)
    except RuntimeError as error:
        raise click.ClickException(f"server for {folder}: {error}") from None


def post(port: int, image: bytes) -> tuple[float, dict]:
    body = json.dumps({"inputs": [base64.b64encode(image).decode()]}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - started, answer


@click.command()
@click.option("--model-version", default="champion", show_default=True)
@click.option("--model-name", default=MODEL_NAME, show_default=True)
@click.option("--requests", "count", default=300, show_default=True, help="Requests per server (after 10 warm-up).")
@click.option(
    "--baseline-ref",
    default="4434d31",
    show_default=True,
    help="Commit whose serving code is the baseline (the last one before out-of-distribution checks).",
)
def main(model_version: str, model_name: str, count: int, baseline_ref: str) -> None:
    import bench
    import mlflow

    from xray.registry import store, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    info = store.resolve_version(model_name, model_version)
    work = Path(tempfile.mkdtemp(prefix="xray-serving-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    current = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.uri, dst_path=str(work / "current")))
    baseline = work / "baseline"
    shutil.copytree(current, baseline)
    shutil.rmtree(baseline / "code" / "xray")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", baseline_ref, "xray"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(baseline / "code", filter="data")
    with zipfile.ZipFile(ROOT.parent / "shared" / "data" / "chest_xray_224.zip") as handle:
        names = sorted(n for n in handle.namelist() if "/test/" in n and n.endswith(".jpeg"))[:50]
        images = [handle.read(n) for n in names]
    ports = {"baseline": free_port(), "current": free_port()}
    servers = {}
    try:
        for name, folder in (("baseline", baseline), ("current", current)):
            servers[name] = serve(folder, ports[name])
        for i in range(10):
            for name in ports:
                post(ports[name], images[i % len(images)])
        latencies, answers = {name: [] for name in ports}, {}
        for i in range(count):
            order = ("baseline", "current") if i % 2 == 0 else ("current", "baseline")
            for name in order:
                seconds, answers[name] = post(ports[name], images[i % len(images)])
                latencies[name].append(seconds)
        assert "ood_score" in answers["current"]["predictions"][0], "the current server must answer with ood_score"
        assert "ood_score" not in answers["baseline"]["predictions"][0], "the baseline must be the code without it"
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(timeout=30)
    summary = {}
    for name, values in latencies.items():
        values = np.array(values) * 1000
        summary[name] = {
            "p50_ms": float(np.percentile(values, 50)),
            "p95_ms": float(np.percentile(values, 95)),
            "mean_ms": float(values.mean()),
        }
    ratio = summary["current"]["p50_ms"] / summary["baseline"]["p50_ms"]
    print(
        json.dumps(
            summary
            | {"p50_ratio": ratio, "requests_per_server": count, "model": info.uri, "baseline_ref": baseline_ref},
            indent=1,
        )
    )
    bench.record(
        "serving_latency_with_ood",
        {
            "value": ratio,
            "unit": "current p50 / baseline p50, single-image requests",
            "baseline_p50_ms": summary["baseline"]["p50_ms"],
            "current_p50_ms": summary["current"]["p50_ms"],
            "baseline_p95_ms": summary["baseline"]["p95_ms"],
            "current_p95_ms": summary["current"]["p95_ms"],
            "requests_per_server": count,
            "baseline_ref": baseline_ref,
            "model": info.uri,
        },
        ".venv/bin/python benchmarks/serving_latency.py " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
