"""The DICOM node's throughput and latency with concurrent senders (issue #43).

    .venv/bin/python benchmarks/node.py [--senders 4] [--studies 12] [--per-study 2] [--rows 1024] [--columns 832]
        [--build-workers 2] [--runtime auto] [--destination pynetdicom|storescp]

A champion-sized classifier (ResNet50V2 at ``--image-size``, random weights: the arithmetic does not depend on them;
no reference profile; its int8, and ``--runtime`` on both sides) runs in a node (xray/serving/node/service.py, the code
of ``run.py node``, ``--build-workers`` as node.build_workers) in this process, with a loopback Storage SCP as its
destination: pynetdicom's in this process, or dcmtk's ``storescp`` in processes of its own. ``--senders`` threads,
each running one dcmtk ``storescu`` process per study (another process, as a modality is), send ``--studies`` studies
each of ``--per-study`` 12-bit DX radiographs (made from the shared test JPEGs, ``--rows`` x ``--columns``), back to
back.

- **bare rate**: the same files through the one prediction path alone (``ChestXrayPredictor.predict_bytes``, batches
  of the node's size), after a warm-up; images per second, the median of three passes.
- **node rate**: images / (the last report's arrival at the destination - the first C-STORE - ``--stable-seconds``):
  everything the node does (receive, sync to the spool, read back, predict, build each report, the prediction log,
  C-STORE out, prune) except the one stability window an operator configures (the first study cannot be analysed
  before it). **fraction** = node rate / bare rate (target at least 0.8).
- **where the node's time goes**, per image: ``receive`` (the C-STORE handlers: the header read, the spool's synced
  write), and the analysis thread's ``predict`` (read back, decode, model), ``build`` (the report; with build
  processes, what the thread waits for them), ``record``
  (outbox, prediction log, done marks) and ``deliver`` (C-STORE out); ``bare_ms_per_image`` beside them.
- **CPU per image** (user and system): the bare path's; the node's (its process, every thread, and its build
  processes); the senders' storescu apart. **ceiling** = the node rate its CPU per image would allow with every core
  busy, over the bare rate: the fraction no scheduling can beat on this machine.
- **latency**: per study, from its stability (its last instance's C-STORE success + ``--stable-seconds``) to the arrival
  of its last report at the destination; p50 and p95.

Records ``node_throughput_fraction`` (the fraction, with the rates and latencies) in benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from xray.environment import apply_defaults  # noqa: E402

apply_defaults()

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

from fixtures.destination import Destination, StorescpDestination, free_port  # noqa: E402
from fixtures.dicom_factory import radiograph  # noqa: E402
from xray.config.model import ModelConfig  # noqa: E402
from xray.config.node import NodeConfig  # noqa: E402
from xray.model.network import build_model  # noqa: E402
from xray.monitoring.prediction_log import PredictionLog  # noqa: E402
from xray.serving.node.service import BATCH, Node  # noqa: E402
from xray.serving.predictor import ChestXrayPredictor  # noqa: E402
from xray.storage import sources  # noqa: E402

MODEL = "chest-xray-classifier"


def test_jpegs() -> list[bytes]:
    """The mini archive's test JPEGs (47), in name order."""
    with zipfile.ZipFile(sources.SHARED_ARCHIVE.parent / "chest_xray_mini.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("chest_xray/test/") and n.endswith(".jpeg"))
        return [archive.read(name) for name in names]


def studies(count: int, per_study: int, rows: int, columns: int) -> list[list[bytes]]:
    jpegs = test_jpegs()
    made = []
    for index in range(count):
        study_uid = pydicom.uid.generate_uid()
        files = []
        for jpeg in jpegs[index * per_study : (index + 1) * per_study] or jpegs[:per_study]:
            grey = Image.open(io.BytesIO(jpeg)).convert("L").resize((columns, rows), Image.Resampling.BICUBIC)
            files.append(radiograph(np.asarray(grey), bits=12, StudyInstanceUID=study_uid, PatientID="BENCH"))
        made.append(files)
    return made


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user and system) of this process (every thread) and of its ended children (the senders' storescu,
    the destination's storescp)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def processes_cpu_seconds(pids) -> float:
    """CPU seconds (user and system) so far of the running processes ``pids`` (/proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: the stat fields 14 and 15, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def sender(port: int, batch: list[list[Path]], sent: dict, lock: threading.Lock) -> None:
    """One sender: dcmtk's storescu (another process, as a modality is), one association per study, back to back."""
    for files in batch:
        command = ["storescu", "-aet", "MODALITY", "-aec", "XRAY_AI", "127.0.0.1", str(port), *map(str, files)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        with lock:
            sent[pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID] = time.time()


def destination_in(kind: str, folder: Path) -> Destination | StorescpDestination:
    """The results' destination: dcmtk's storescp in processes of its own, writing to ``folder``, or pynetdicom's."""
    if kind == "pynetdicom":
        return Destination()
    folder.mkdir()
    return StorescpDestination(str(folder))


def measure(
    senders: int = 4,
    per_sender: int = 12,
    per_study: int = 2,
    size: tuple[int, int] = (1024, 832),
    image_size: int = 128,
    stable_seconds: float = 2.0,
    build_workers: int = NodeConfig().build_workers,
    runtime: str = "auto",
    destination_kind: str = "pynetdicom",
) -> dict:
    """The node's rate against the bare prediction path's, and its stability-to-result latencies (module docstring)."""
    from inference_at_scale import bench_int8

    model, _ = build_model(ModelConfig(image_size=image_size), None)
    predictor = ChestXrayPredictor(model, 0.5, image_size, "1")
    bench_int8(predictor, test_jpegs()[:64])  # the int8 a registered version carries, and auto's choice, as run.py node
    predictor.use_runtime(runtime)
    made = studies(senders * per_sender, per_study, *size)
    files = [data for study in made for data in study]
    predictor.predict_bytes(files[:BATCH])  # warm-up: the model's graph for both sides
    passes = []  # (seconds, CPU seconds) of each pass over the files; the median pass is the bare path's
    for _ in range(3):
        start, cpu_start = time.perf_counter(), cpu_seconds()[0]
        for first in range(0, len(files), BATCH):
            predictor.predict_bytes(files[first : first + BATCH])
        passes.append((time.perf_counter() - start, cpu_seconds()[0] - cpu_start))
    bare_seconds, bare_cpu = sorted(passes)[1]
    bare = len(files) / bare_seconds
    result = {"senders": senders, "studies": len(made), "images": len(files), "per_study": per_study}
    result |= {"rows": size[0], "columns": size[1], "image_size": image_size, "build_workers": build_workers}
    result |= {
        "destination": destination_kind,
        "runtime": predictor.runtime,
        "cpus": os.cpu_count(),
        "stable_seconds": stable_seconds,
        "load_average_1min_at_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="xray-bench-node-") as folder, contextlib.ExitStack() as stack:
        destination = stack.enter_context(destination_in(destination_kind, Path(folder) / "destination").running())
        config = NodeConfig(
            port=free_port(),
            spool=str(Path(folder) / "spool"),
            stable_seconds=stable_seconds,
            destinations=[destination.uri],
            build_workers=build_workers,
        )
        log = PredictionLog(str(Path(folder) / "log"), "node")
        node = Node(config, predictor, MODEL, log=log)
        node.start()
        for started in node.warming:  # the build processes started and warm before the clock, as in a running node
            started.result()
        sent: dict[str, float] = {}
        lock = threading.Lock()
        paths = []
        for number, study in enumerate(made):
            paths.append([Path(folder) / f"study{number}-{index}.dcm" for index in range(len(study))])
            for path, data in zip(paths[-1], study):
                path.write_bytes(data)
        threads = [
            threading.Thread(target=sender, args=(config.port, paths[index::senders], sent, lock))
            for index in range(senders)
        ]
        builders = list(node.pool._processes) if node.pool is not None else []  # noqa: SLF001 - their pids
        first_sent, cpu_at_first, builders_at_first = time.time(), cpu_seconds(), processes_cpu_seconds(builders)
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 1800
        while len(destination.arrived) < len(files):
            assert time.monotonic() < deadline, "the node did not report every image in 30 minutes"
            time.sleep(0.2)
        for thread in threads:
            thread.join()
        cpu_at_last, builders_cpu = cpu_seconds(), processes_cpu_seconds(builders) - builders_at_first
        node.stop()
        per_image = {f"{stage}_ms_per_image": 1000 * seconds / len(files) for stage, seconds in node.seconds.items()}
        per_image["receive_ms_per_image"] = 1000 * node.receiver.seconds / len(files)
        arrivals = {destination.uid_of(key): at for key, at in destination.arrived.items()}
        reports = {str(r.SOPInstanceUID): str(r.StudyInstanceUID) for r in destination.objects("SR")}
    rate = len(files) / (max(arrivals.values()) - first_sent - stable_seconds)
    node_cpu = cpu_at_last[0] - cpu_at_first[0] + builders_cpu
    latencies = [
        max(arrivals[sop] for sop, study in reports.items() if study == study_uid) - (sent_at + stable_seconds)
        for study_uid, sent_at in sent.items()
    ]
    return result | {
        "value": rate / bare,
        "bare_images_per_s": bare,
        "node_images_per_s": rate,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": float(np.percentile(latencies, 95)),
        "latency_max_s": max(latencies),
        "bare_ms_per_image": 1000 / bare,
        "bare_cpu_ms_per_image": 1000 * bare_cpu / len(files),
        "node_cpu_ms_per_image": 1000 * node_cpu / len(files),
        "node_process_cpu_ms_per_image": 1000 * (cpu_at_last[0] - cpu_at_first[0]) / len(files),
        "build_processes_cpu_ms_per_image": 1000 * builders_cpu / len(files),
        "senders_cpu_ms_per_image": 1000 * (cpu_at_last[1] - cpu_at_first[1]) / len(files),
        "ceiling": (os.cpu_count() or 1) / node_cpu / bare * len(files),
        **per_image,
        "load_average_1min_at_end": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--studies", type=int, default=12, help="studies per sender")
    parser.add_argument("--per-study", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--columns", type=int, default=832)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    parser.add_argument("--build-workers", type=int, default=NodeConfig().build_workers)
    parser.add_argument(
        "--destination",
        choices=("storescp", "pynetdicom"),
        default="pynetdicom",
        help="storescp: dcmtk's, in processes of its own (a PACS on another machine); pynetdicom: in this process",
    )
    parser.add_argument(
        "--runtime", default="auto", help="the predictor's runtime on both sides (auto: as run.py node)"
    )
    args = parser.parse_args()
    result = measure(
        args.senders,
        args.studies,
        args.per_study,
        (args.rows, args.columns),
        args.image_size,
        args.stable_seconds,
        args.build_workers,
        args.runtime,
        args.destination,
    )
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    from bench import record

    record("node_throughput_fraction", result, ".venv/bin/python benchmarks/node.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
