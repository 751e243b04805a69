"""What writing results back to a PACS costs per image, with and without the heatmaps (issue #42).

    python benchmarks/write_back.py [--images 24] [--rows 2048] [--columns 1664] [--image-size 128]

Starts the suite's Orthanc (infra/pacs.py, a temporary state, loopback) and STOWs ``--images`` 12-bit DX radiographs of
``--rows`` x ``--columns`` made from the shared test JPEGs (fixtures/dicom_factory.py). A champion-sized classifier
(ResNet50V2 at ``--image-size``, random weights: Grad-CAM's arithmetic does not depend on them, and without a reference
profile every image is ``ok``, so every image gets heatmaps) predicts them through ``predict_source``; the write-back
is timed around each batch's ``ReportWriter.write``: once writing the reports alone, once (another model version, so
nothing is found in the PACS) the reports and the heatmaps. Then the heatmap path's parts, per image, on the same
images: the second WADO-RS read and decode, Grad-CAM, the Segmentation, the Secondary Capture, and their sizes.
Records ``write_back_cost`` in benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from xray.environment import apply_defaults  # noqa: E402

apply_defaults()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fixtures.dicom_factory import radiograph  # noqa: E402
from infra.pacs import Pacs  # noqa: E402
from xray.config.inference import InferenceConfig  # noqa: E402
from xray.config.model import ModelConfig  # noqa: E402
from xray.data.images import decode_image  # noqa: E402
from xray.model import gradcam  # noqa: E402
from xray.model.network import build_model  # noqa: E402
from xray.serving import sr  # noqa: E402
from xray.serving.batch import Wanted, predict_source  # noqa: E402
from xray.serving.predictor import ChestXrayPredictor  # noqa: E402
from xray.storage import dicomweb, sources  # noqa: E402

MODEL = "chest-xray-classifier"


def radiographs(count: int, rows: int, columns: int) -> list[bytes]:
    with zipfile.ZipFile(sources.SHARED_ARCHIVE.parent / "chest_xray_mini.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("chest_xray/test/") and n.endswith(".jpeg"))
        jpegs = [archive.read(name) for name in names[:count]]
    if len(jpegs) < count:
        raise SystemExit(f"error: the mini archive's test folder holds {len(jpegs)} images; ask for at most that many")
    made = []
    for jpeg in jpegs:
        grey = Image.open(io.BytesIO(jpeg)).convert("L").resize((columns, rows), Image.Resampling.BICUBIC)
        made.append(radiograph(np.asarray(grey), bits=12, PatientID="BENCH"))
    return made


def timed_write(writer: sr.ReportWriter) -> tuple[callable, list[float]]:
    spent = []

    def write(table):
        start = time.perf_counter()
        writer.write(table)
        spent.append(time.perf_counter() - start)

    return write, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--columns", type=int, default=1664)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    model, _ = build_model(ModelConfig(image_size=args.image_size), None)
    predictor = ChestXrayPredictor(model, 0.5, args.image_size, "1")
    settings = InferenceConfig(batch_size=8)
    with tempfile.TemporaryDirectory() as state:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        pacs = Pacs(state=Path(state), port=port, password="bench-password")
        os.environ.update({dicomweb.USER_ENV: pacs.user, dicomweb.PASSWORD_ENV: pacs.password})
        pacs.up(die_with_parent=True)
        try:
            client = dicomweb.Client(dicomweb.parse(pacs.dicomweb))
            for data in radiographs(args.images, args.rows, args.columns):
                client.store([data])
            predict_source(predictor, pacs.dicomweb, settings)  # warm-up: the model's graph, the PACS's caches
            result = {"images": args.images, "rows": args.rows, "columns": args.columns, "image_size": args.image_size}
            result["load_average_1min_at_start"] = os.getloadavg()[0]  # a shared VM: other work slows every number
            for name, version, heatmaps in (("reports", "2", False), ("reports_and_heatmaps", "3", True)):
                writer = sr.ReportWriter(pacs.dicomweb, MODEL, version, heatmaps=heatmaps, predictor=predictor)
                write, spent = timed_write(writer)
                stream = predict_source(predictor, pacs.dicomweb, settings, wanted=Wanted(on_batch=write))
                assert writer.written == args.images and writer.heatmaps_written == (args.images if heatmaps else 0)
                result[f"{name}_ms_per_image"] = 1000 * sum(spent) / args.images
                result[f"{name}_predict_ms_per_image"] = 1000 * (stream.seconds - sum(spent)) / args.images
            result["heatmaps_ms_per_image"] = (
                result["reports_and_heatmaps_ms_per_image"] - result["reports_ms_per_image"]
            )
            parts = {"read_and_decode": [], "gradcam": [], "segmentation": [], "capture": [], "report": []}
            sizes = {"segmentation": [], "capture": [], "report": []}
            for study, series, instance in client.instances(Counter()):
                header = sr.source_header(client.metadata(study, series, instance))
                if header.SOPClassUID != "1.2.840.10008.5.1.4.1.1.1.1":
                    continue
                start = time.perf_counter()
                check, image = decode_image(client.retrieve(study, series, instance))
                picture = image.convert("L")
                picture.thumbnail((sr.CAPTURE_SIDE, sr.CAPTURE_SIDE))
                picture = np.asarray(picture)
                parts["read_and_decode"].append(time.perf_counter() - start)
                start = time.perf_counter()
                pixels = gradcam.pixels_of([check.converted], args.image_size)
                heatmap = gradcam.heatmaps(model, pixels, 0.5, [True])[0]
                parts["gradcam"].append(time.perf_counter() - start)
                row = {"status": "ok", "probability": 0.7, "threshold": 0.5, "label": "PNEUMONIA", "reason": ""}
                built = {}
                for kind, build in (
                    ("segmentation", lambda: sr.heatmap_segmentation(header, row, heatmap, MODEL, "9")),
                    ("capture", lambda: sr.heatmap_capture(header, row, heatmap, picture, MODEL, "9")),
                    ("report", lambda: sr.report(header, row, MODEL, "9", (built["segmentation"], built["capture"]))),
                ):
                    start = time.perf_counter()
                    built[kind] = build()
                    data = sr.part10(built[kind])
                    parts[kind].append(time.perf_counter() - start)
                    sizes[kind].append(len(data))
            # Grad-CAM one image at a time pays its probe model per call; the writer explains a batch at once.
            result |= {f"{part}_ms_median": 1000 * statistics.median(times) for part, times in parts.items()}
            result |= {f"{kind}_kb_median": statistics.median(sizes[kind]) / 1024 for kind in sizes}
            result["load_average_1min_at_end"] = os.getloadavg()[0]
        finally:
            pacs.down()
    for key, value in result.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    from bench import record

    record("write_back_cost", result, "python benchmarks/write_back.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
