"""The DICOM node's throughput and latency with concurrent senders (issue #43).

    .venv/bin/python benchmarks/node.py [--senders 4] [--studies 6] [--per-study 2] [--rows 1024] [--columns 832]

A champion-sized classifier (ResNet50V2 at ``--image-size``, random weights: the arithmetic does not depend on them;
no reference profile) runs in a node (xray/serving/node/service.py, the code of ``run.py node``) in this process, with
a loopback pynetdicom Storage SCP as its destination, also in this process. ``--senders`` threads, each a pynetdicom
SCU with its own associations, send ``--studies`` studies each of ``--per-study`` 12-bit DX radiographs (made from the
shared test JPEGs, ``--rows`` x ``--columns``), one association per study, back to back.

- **bare rate**: the same files through the one prediction path alone (``ChestXrayPredictor.predict_bytes``, batches
  of the node's size), after a warm-up; images per second.
- **node rate**: images / (the last report's arrival at the destination - the first C-STORE - ``--stable-seconds``):
  everything the node does (receive, sync to the spool, read back, predict, build each report, the prediction log,
  C-STORE out, prune) except the one stability window an operator configures (the first study cannot be analysed
  before it). **fraction** = node rate / bare rate (target at least 0.8).
- **latency**: per study, from its stability (its last instance's C-STORE success + ``--stable-seconds``) to the arrival
  of its last report at the destination; p50 and p95.

Records ``node_throughput_fraction`` (the fraction, with the rates and latencies) in benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from xray.environment import apply_defaults  # noqa: E402

apply_defaults()

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import free_port  # noqa: E402
from dicom_factory import radiograph  # noqa: E402
from node_tools import Destination  # noqa: E402
from xray.config.model import ModelConfig  # noqa: E402
from xray.config.node import NodeConfig  # noqa: E402
from xray.model.network import build_model  # noqa: E402
from xray.monitoring.prediction_log import PredictionLog  # noqa: E402
from xray.serving.node.service import BATCH, Node  # noqa: E402
from xray.serving.predictor import ChestXrayPredictor  # noqa: E402
from xray.storage import sources  # noqa: E402

MODEL = "chest-xray-classifier"


def studies(count: int, per_study: int, rows: int, columns: int) -> list[list[bytes]]:
    with zipfile.ZipFile(sources.SHARED_ARCHIVE.parent / "chest_xray_mini.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("chest_xray/test/") and n.endswith(".jpeg"))
        jpegs = [archive.read(name) for name in names]
    made = []
    for index in range(count):
        study_uid = pydicom.uid.generate_uid()
        files = []
        for jpeg in jpegs[index * per_study : (index + 1) * per_study] or jpegs[:per_study]:
            grey = Image.open(io.BytesIO(jpeg)).convert("L").resize((columns, rows), Image.Resampling.BICUBIC)
            files.append(radiograph(np.asarray(grey), bits=12, StudyInstanceUID=study_uid, PatientID="BENCH"))
        made.append(files)
    return made


def sender(port: int, batch: list[list[bytes]], sent: dict, lock: threading.Lock) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.DigitalXRayImageStorageForPresentation, pydicom.uid.ExplicitVRLittleEndian)
    for files in batch:
        association = ae.associate("127.0.0.1", port, ae_title="XRAY_AI")
        assert association.is_established, "the node refused the association"
        for data in files:
            status = association.send_c_store(pydicom.dcmread(io.BytesIO(data)))
            assert status and status.Status == 0, f"C-STORE status {getattr(status, 'Status', None)}"
        association.release()
        with lock:
            sent[pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True).StudyInstanceUID] = time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--studies", type=int, default=6, help="studies per sender")
    parser.add_argument("--per-study", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--columns", type=int, default=832)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    args = parser.parse_args()
    model, _ = build_model(ModelConfig(image_size=args.image_size), None)
    predictor = ChestXrayPredictor(model, 0.5, args.image_size, "1")
    made = studies(args.senders * args.studies, args.per_study, args.rows, args.columns)
    files = [data for study in made for data in study]
    predictor.predict_bytes(files[:BATCH])  # warm-up: the model's graph for both sides
    start = time.perf_counter()
    for first in range(0, len(files), BATCH):
        predictor.predict_bytes(files[first : first + BATCH])
    bare = len(files) / (time.perf_counter() - start)
    destination = Destination()
    result = {"senders": args.senders, "studies": len(made), "images": len(files), "per_study": args.per_study}
    result |= {"rows": args.rows, "columns": args.columns, "image_size": args.image_size}
    result |= {"stable_seconds": args.stable_seconds, "load_average_1min_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="xray-bench-node-") as folder, destination.running():
        config = NodeConfig(
            port=free_port(),
            spool=str(Path(folder) / "spool"),
            stable_seconds=args.stable_seconds,
            destinations=[destination.uri],
        )
        log = PredictionLog(str(Path(folder) / "log"), "node")
        node = Node(config, predictor, MODEL, log=log).start()
        sent: dict[str, float] = {}
        lock = threading.Lock()
        threads = [
            threading.Thread(target=sender, args=(config.port, made[index :: args.senders], sent, lock))
            for index in range(args.senders)
        ]
        first_sent = time.time()
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 1800
        while len(destination.objects("SR")) < len(files):
            assert time.monotonic() < deadline, "the node did not report every image in 30 minutes"
            time.sleep(0.2)
        for thread in threads:
            thread.join()
        node.stop()
        arrivals = dict(destination.arrived)
        reports = {str(r.SOPInstanceUID): str(r.StudyInstanceUID) for r in destination.objects("SR")}
    last = max(arrivals.values())
    rate = len(files) / (last - first_sent - args.stable_seconds)
    latencies = []
    for study_uid, sent_at in sent.items():
        done = max(arrivals[sop] for sop, study in reports.items() if study == study_uid)
        latencies.append(done - (sent_at + args.stable_seconds))
    result |= {
        "value": rate / bare,
        "bare_images_per_s": bare,
        "node_images_per_s": rate,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": float(np.percentile(latencies, 95)),
        "latency_max_s": max(latencies),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    from bench import record

    record("node_throughput_fraction", result, ".venv/bin/python benchmarks/node.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
