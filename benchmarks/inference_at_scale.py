"""Inference at scale, each side measured in one run (issue #18): the streamed batch path and REST serving, each
against the bare model on the same machine at the same moment.

Called by bench.py (``--only stream_inference_model_fraction stream_inference_memory_ratio
serving_throughput_fraction``); ``.venv/bin/python benchmarks/inference_at_scale.py stream-child N FOLDER WORKDIR`` is the
child process of the memory benchmark (peak RSS is per process, so each size gets its own).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE, BATCH = 128, 32  # configs/training_local.yaml


def stream_settings():
    """What the inference pipeline streams with (xray.config.inference.InferenceConfig's defaults), at the bench's
    batch."""
    from xray.config.inference import InferenceConfig

    return InferenceConfig(batch_size=BATCH)


def bench_predictor(profile_dir: Path | None = None, train_paths=(), val_paths=()):
    """ChestXrayPredictor on ResNet50V2 at 128 px (random weights: speed does not depend on them) with a reference
    profile fitted on real train/val images, or loaded from ``profile_dir``."""
    from xray.config.model import ModelConfig
    from xray.model.network import build_model
    from xray.monitoring import ood
    from xray.serving.predictor import ChestXrayPredictor

    model, _ = build_model(ModelConfig(image_size=IMAGE_SIZE), None)
    if profile_dir is not None and (profile_dir / ood.PROFILE_JSON).is_file():
        profile = ood.ReferenceProfile.load(profile_dir)
    else:
        train, val = ood.features_of_files(list(train_paths)), ood.features_of_files(list(val_paths))
        profile = ood.fit_profile(train, val, np.random.default_rng(0).uniform(0, 1, len(val)), 0.5)
        if profile_dir is not None:
            profile.save(profile_dir)
    predictor = ChestXrayPredictor(model, 0.5, IMAGE_SIZE, "bench", profile)
    if train_paths:
        predictor.bench_int8 = bench_int8(predictor, [Path(p).read_bytes() for p in list(train_paths)[:64]])
    predictor.use_runtime("auto")  # as batch inference and serving: the version's int8 against bf16 on this CPU
    return predictor


def bench_int8(predictor, calibration: list[bytes]):
    """The bench model's int8, carried as a registered version carries its own (``predictor.int8_ir``), made with
    registration's recipe (xray.serving.runtimes.int8: the in-model preprocessing fp32) on the encoded images
    ``calibration`` but without the val control (random weights have no accuracy to keep; speed does not depend on them). The
    outcome, for :func:`register_bench_model`."""
    import nncf
    import openvino as ov
    import tensorflow as tf

    from xray.data.images import decode_and_resize
    from xray.serving.predictor import openvino_model
    from xray.serving.runtimes import int8

    size = predictor.image_size
    pixels = [decode_and_resize(tf.constant(data), size).numpy() for data in calibration]
    fp32 = openvino_model(predictor.model)
    scope = nncf.IgnoredScope(names=int8.preprocessing_operations(fp32), validate=False)
    data = nncf.Dataset(pixels, lambda x: x[None])
    with int8.on_stderr():
        quantized = nncf.quantize(fp32, data, subset_size=len(pixels), ignored_scope=scope)
    outcome = int8.Int8Outcome(quantized, "", int8.Recipe(subset_size=len(pixels)), None)
    with tempfile.TemporaryDirectory(prefix="xray-bench-int8-") as folder:
        ov.save_model(quantized, Path(folder) / "model.xml", compress_to_fp16=False)
        predictor.int8_ir = ((Path(folder) / "model.xml").read_bytes(), (Path(folder) / "model.bin").read_bytes())
    return outcome


def bare_batch_rate(predictor, batch: int = BATCH, batches: int = 15) -> float:
    """images/s of the compiled model call alone on in-memory uint8 tensors of ``batch`` images."""
    pixels = np.random.default_rng(0).integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    predictor.probabilities(pixels)  # trace
    started = time.perf_counter()
    for _ in range(batches):
        predictor.probabilities(pixels)
    return batch * batches / (time.perf_counter() - started)


def upload(client, bucket: str, prefix: str, paths: list[str], workers: int = 16) -> None:
    def put(item):
        index, path = item
        client.put_object(Bucket=bucket, Key=f"{prefix}{index:06d}.jpeg", Body=Path(path).read_bytes())

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, enumerate(paths)))


def stream_inference_model_fraction(train_paths: list[str], val_paths: list[str], workdir: Path, images=5000) -> dict:
    """images/s of the streamed pipeline over ``images`` files in a local folder (the pipeline's own overhead: list,
    read, hash, decode, screen, predict, write) over the bare model's images/s on in-memory tensors at the same batch
    size (measured before and after, averaged). The same objects under an S3 prefix are recorded beside it, from a
    moto server in its own process, whose CPU time is reported separately: on this machine's two cores the endpoint
    competes with the model, which a real S3 endpoint does not (issue #33: the benchmark decided)."""
    import logging

    from xray.serving import batch
    from xray.storage import s3

    settings = stream_settings()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    predictor = bench_predictor(workdir / "profile", train_paths[:400], val_paths[:200])
    sources = [train_paths[i % len(train_paths)] for i in range(images)]
    folder = workdir / "stream_folder"
    folder.mkdir(exist_ok=True)
    for index, path in enumerate(sources):
        if not (folder / f"{index:06d}.jpeg").exists():
            os.link(path, folder / f"{index:06d}.jpeg")
    warm = workdir / "stream_warm_up"  # the stream's own compiled call traced, and the files read once, first
    warm.mkdir(exist_ok=True)
    for index, path in enumerate(sources[:256]):
        if not (warm / f"{index:06d}.jpeg").exists():
            os.link(path, warm / f"{index:06d}.jpeg")
    batch.predict_source(predictor, str(warm), settings)
    for path in folder.iterdir():
        path.read_bytes()
    before = bare_batch_rate(predictor)
    with batch.PredictionWriter(str(workdir / "stream_folder.csv")) as writer:
        local = batch.predict_source(predictor, str(folder), settings, writer)
    middle = bare_batch_rate(predictor)

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*s3.EmbeddedS3.FAKE_ENV, "AWS_ENDPOINT_URL_S3")}
    os.environ.update(s3.EmbeddedS3.FAKE_ENV | {"AWS_ENDPOINT_URL_S3": endpoint})
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the moto server did not start")
            time.sleep(0.2)
        client = s3.make_client()
        client.create_bucket(Bucket="bench")
        started = time.perf_counter()
        upload(client, "bench", "stream/", sources)
        upload_seconds = time.perf_counter() - started
        cpu_before = _cpu_seconds(server.pid)
        with batch.PredictionWriter(str(workdir / "stream.csv")) as writer:
            remote = batch.predict_source(predictor, "s3://bench/stream/", settings, writer)
        endpoint_cpu = _cpu_seconds(server.pid) - cpu_before
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    after = bare_batch_rate(predictor)
    from_folder = local.images / local.seconds
    streamed = remote.images / remote.seconds
    return {
        "value": from_folder / ((before + middle) / 2),
        "folder_images_per_s": from_folder,
        "bare_model_images_per_s": (before + middle) / 2,
        "bare_before_between_after": [before, middle, after],
        "s3_images_per_s": streamed,
        "s3_fraction": streamed / ((middle + after) / 2),
        "s3_endpoint_cpu_seconds": endpoint_cpu,
        "s3_endpoint_cpu_share_of_run": endpoint_cpu / remote.seconds,
        "s3_upload_seconds": upload_seconds,
        "images": local.images,
        "unreadable": local.unreadable + remote.unreadable,
        "source": f"a local folder of {images} JPEG files; beside it s3://bench/stream/ on a moto server ({endpoint})",
        "image_size": IMAGE_SIZE,
        "batch_size": settings.batch_size,
        "fetch_workers": settings.fetch_workers,
        "window": settings.window,
    }


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def dicomweb_rate(predictor, files: list[Path], workdir: Path, settings) -> dict:
    """images/s of the stream from a local Orthanc over DICOMweb (QIDO-RS pages, one WADO-RS GET per instance), the
    same files stowed first; Orthanc runs on this machine's two cores beside the model (its CPU time is reported)."""
    import socket

    from infra.pacs import Pacs
    from xray.serving import batch
    from xray.storage import dicomweb

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pacs = Pacs(state=workdir / "pacs", port=port)
    process = pacs.up(die_with_parent=True)
    try:
        client = dicomweb.Client(dicomweb.parse(pacs.dicomweb))
        started = time.perf_counter()
        for start in range(0, len(files), 50):
            client.store([path.read_bytes() for path in files[start : start + 50]])
        stow_seconds = time.perf_counter() - started
        cpu_before = _cpu_seconds(process.pid)
        with batch.PredictionWriter(str(workdir / "dicomweb.csv")) as writer:
            result = batch.predict_source(predictor, pacs.dicomweb, settings, writer)
        orthanc_cpu = _cpu_seconds(process.pid) - cpu_before
    finally:
        pacs.down()
    assert result.images == len(files) and result.unreadable == 0
    return {
        "images": result.images,
        "images_per_s": result.images / result.seconds,
        "stow_seconds": stow_seconds,
        "orthanc_cpu_seconds": orthanc_cpu,
        "orthanc_cpu_share_of_run": orthanc_cpu / result.seconds,
        "source": f"Orthanc 1.10 + DICOMweb plugin on 127.0.0.1:{port}, basic authentication",
    }


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dicom_decode_fraction(
    train_paths: list[str], val_paths: list[str], workdir: Path, images=2000, dicomweb_images=1000
) -> dict:
    """images/s of the streamed pipeline over a folder of 12-bit DICOMs (explicit VR, a VOI window: the common CR/DX
    export) made from ``images`` training JPEGs, over the same images as JPEG; the two folders are streamed in
    turns (JPEG, DICOM, JPEG, DICOM), each rate the mean of its two passes. A JPEG-LS and a JPEG 2000 lossless folder
    are measured beside them, and ``dicomweb_images`` of the DICOMs streamed from a local Orthanc over DICOMweb,
    recorded without a target."""
    from fixtures.dicom_factory import radiograph
    from xray.serving import batch

    settings = stream_settings()
    predictor = bench_predictor(workdir / "profile", train_paths[:400], val_paths[:200])
    sources = [train_paths[i % len(train_paths)] for i in range(images)]
    folders = {name: workdir / f"dicom_{name}" for name in ("jpeg", "dicom", "jpeg-ls", "jpeg2000-lossless")}
    for name, folder in folders.items():
        folder.mkdir(exist_ok=True)
        for index, path in enumerate(sources):
            if name == "jpeg":
                os.link(path, folder / f"{index:06d}.jpeg")
            else:
                syntax = "explicit" if name == "dicom" else name
                (folder / f"{index:06d}.dcm").write_bytes(radiograph(Path(path).read_bytes(), bits=12, syntax=syntax))

    def rate(name: str) -> float:
        with batch.PredictionWriter(str(workdir / f"dicom_{name}.csv")) as writer:
            result = batch.predict_source(predictor, str(folders[name]), settings, writer)
        assert result.unreadable == 0, f"{result.unreadable} of the {name} files were unreadable"
        return result.images / result.seconds

    rate("jpeg")  # warm-up: the model traced, the files in the page cache
    passes = {name: [] for name in folders}
    for _ in range(2):
        for name in ("jpeg", "dicom"):
            passes[name].append(rate(name))
    for name in ("jpeg-ls", "jpeg2000-lossless"):
        passes[name].append(rate(name))
    rates = {name: statistics.mean(values) for name, values in passes.items()}
    pacs = dicomweb_rate(predictor, sorted(folders["dicom"].iterdir())[:dicomweb_images], workdir, settings)
    bare = bare_batch_rate(predictor)
    return {
        "value": rates["dicom"] / rates["jpeg"],
        "dicomweb_images_per_s": pacs["images_per_s"],
        "dicomweb_fraction_of_jpeg_folder": pacs["images_per_s"] / rates["jpeg"],
        "dicomweb_fraction_of_bare_model": pacs["images_per_s"] / bare,
        "dicomweb": pacs,
        "bare_model_images_per_s": bare,
        "jpeg_images_per_s": rates["jpeg"],
        "dicom_images_per_s": rates["dicom"],
        "passes": passes,
        "jpeg_ls_fraction": rates["jpeg-ls"] / rates["jpeg"],
        "jpeg2000_lossless_fraction": rates["jpeg2000-lossless"] / rates["jpeg"],
        "images": images,
        "dicom": "12 bits stored in 16, explicit VR little endian, a VOI window; 224 x 224 (the shared JPEGs' size)",
        "image_size": IMAGE_SIZE,
        "batch_size": settings.batch_size,
        "fetch_workers": settings.fetch_workers,
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stream_child(count: int, folder: Path, workdir: Path) -> None:
    """Stream ``count`` images; report the process's peak RSS and, sampled every 50 ms, the peak while streaming
    (the process peak may be set before, while the model is built and traced)."""
    from xray.environment import apply_defaults

    apply_defaults()
    from xray.serving import batch

    settings = stream_settings()

    predictor = bench_predictor(workdir / "profile")
    predictor.probabilities_of_encoded([(folder / "000000.jpeg").read_bytes()])  # trace before the baseline
    before, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], _rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with batch.PredictionWriter(str(workdir / f"memory_{count}.csv")) as writer:
        result = batch.predict_source(predictor, str(folder), settings, writer)
    done.set()
    sampler.join()
    print(
        json.dumps(
            {
                "images": result.images,
                "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_before_stream_mb": before,
                "stream_peak_rss_mb": peak[0],
                "images_per_s": result.images / result.seconds,
            }
        )
    )


def stream_inference_memory_ratio(paths: list[str], workdir: Path, small=2000, large=20000) -> dict:
    """Peak RSS while streaming ``large`` images over that of ``small``, each in its own process; the images are
    hard links to the test split's files, repeated."""
    results = {}
    for count in (small, large):
        folder = workdir / f"links_{count}"
        folder.mkdir(exist_ok=True)
        for i in range(count):
            target = folder / f"{i:06d}.jpeg"
            if not target.exists():
                os.link(paths[i % len(paths)], target)
        output = subprocess.run(
            [sys.executable, __file__, "stream-child", str(count), str(folder), str(workdir)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
        results[count] = json.loads(output.strip().splitlines()[-1])
        print(f"  {count} images: {results[count]}", file=sys.stderr, flush=True)
    return {
        "value": results[large]["stream_peak_rss_mb"] / results[small]["stream_peak_rss_mb"],
        "definition": "peak RSS while streaming (sampled every 50 ms), 20,000 images over 2,000, each in a fresh "
        "process after the model is built and traced",
        **{
            key: {str(k): v[key] for k, v in results.items()} for key in next(iter(results.values())) if key != "images"
        },
        "image_size": IMAGE_SIZE,
        **stream_settings().model_dump(include={"batch_size", "fetch_workers", "window"}),
    }


# ---------------------------------------------------------------------------------------------------------------
# Serving


def register_bench_model(predictor, workdir: Path) -> tuple[dict, str]:
    """The bench model registered as the pipeline registers one (Keras + serving flavors, profile) in a temporary
    MLflow store; returns (environment for the server, model URI)."""
    import mlflow

    from xray.registry import store
    from xray.serving import bundle

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench")
    with mlflow.start_run():
        metadata = {"threshold": 0.5, "image_size": IMAGE_SIZE, "preprocessing": "fixed"}
        files = bundle.VersionFiles(predictor.model, predictor.profile, getattr(predictor, "bench_int8", None))
        store.log_and_register(files, "bench-xray", metadata, "bench model")
    env = os.environ | {
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}",
    }
    return env, "models:/bench-xray/1"


def serve(model_uri: str, env: dict, port: int, workers: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(1)
        if server.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with code {server.returncode}")
    server.terminate()
    raise RuntimeError("mlflow models serve did not come up in 300 s")


def load_test(port: int, bodies: list[bytes], clients: int, requests: int) -> dict:
    """``clients`` threads, each with one keep-alive connection, send ``requests`` single-image requests in all."""
    latencies, errors, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for index in counter:
            started = time.perf_counter()
            connection.request(
                "POST", "/invocations", bodies[index % len(bodies)], {"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            body = response.read()
            seconds = time.perf_counter() - started
            with lock:
                latencies.append(seconds)
                if response.status != 200:
                    errors.append(f"{response.status}: {body[:200]!r}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def bare_single_rate(predictor, images: list[bytes], count: int = 100) -> float:
    """images/s of the compiled model call alone on one in-memory image at a time."""
    import tensorflow as tf

    from xray.data.images import decode_and_resize

    pixels = [decode_and_resize(tf.constant(data), IMAGE_SIZE).numpy()[None] for data in images[:10]]
    predictor.probabilities(pixels[0])
    started = time.perf_counter()
    for i in range(count):
        predictor.probabilities(pixels[i % len(pixels)])
    return count / (time.perf_counter() - started)


def serving_throughput_fraction(
    train_paths: list[str], val_paths: list[str], test_paths: list[str], workdir: Path, workers: int | None = None
) -> dict:
    """Served single-image requests/s with 16 clients over the bare model's single-image images/s in-process;
    the 1, 4 and 16 client levels are all recorded, with p50/p95/p99 latency and errors (must be 0)."""
    workers = workers or os.cpu_count() or 1
    predictor = bench_predictor(workdir / "profile", train_paths[:400], val_paths[:200])
    env, model_uri = register_bench_model(predictor, workdir)
    images = [Path(p).read_bytes() for p in test_paths[:50]]
    bodies = [json.dumps({"inputs": [base64.b64encode(data).decode()]}).encode() for data in images]
    port = free_port()
    server = serve(model_uri, env, port, workers)
    try:
        load_test(port, bodies, 4, 40)  # warm every worker
        levels = [load_test(port, bodies, clients, max(100, 30 * clients)) for clients in (1, 4, 16)]
    finally:
        server.terminate()
        server.wait(timeout=60)
    bare = statistics.median(bare_single_rate(predictor, images) for _ in range(3))
    top = levels[-1]
    return {
        "value": top["requests_per_s"] / bare,
        "served_requests_per_s_16_clients": top["requests_per_s"],
        "bare_single_image_images_per_s": bare,
        "levels": levels,
        "errors": sum(level["errors"] for level in levels),
        "serving_p99_ms": top["p99_ms"],
        "server_workers": workers,
        "image_size": IMAGE_SIZE,
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "stream-child":
        stream_child(int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit(__doc__)
