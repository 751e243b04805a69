"""The default local stack's champion at work, from the shared run (conftest.local: the smoke config on
chest_xray_mini.zip, read from an s3:// URI with sentinel credentials): monitoring a shifted batch read from S3, DICOM
batches and a DICOM site, a PACS read over DICOMweb with reports and heatmaps written back, the DICOM node fed by
storescu and Orthanc, feedback and the estimate of a week, sharded inference and the runtime this CPU gets.

The training, the registry and the gate on the same stack are tests/pipelines/test_local_stack.py's; this file is
apart so that under `make test` (--dist loadfile) a second worker carries it, with its own training of the shared
run. Isolated stores: a temporary ZENML_CONFIG_PATH and a temporary SQLite MLflow; the tests run in file order.
"""

import io
import json
import re
import zipfile

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stacks import champion_probabilities, mlflow_client, s3_client, summary_of
from support import FULL_ZIP, MINI_ZIP, ROOT, free_port, run_command

pytestmark = pytest.mark.slow


def _monitor(env, *args):
    return run_command([ROOT / "run.py", "--pipeline", "monitoring", *args], env, 600)


def _registry_state(env):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    return sorted(
        (v.version, v.current_stage, tuple(sorted(v.tags.items())), tuple(sorted(v.aliases)))
        for v in client.search_model_versions("name='chest-xray-classifier'")
    )


def test_monitoring_a_shifted_batch_on_s3_reports_drift_and_never_touches_the_registry(local, tmp_path):
    """Inverted radiographs under an s3:// prefix, with --fail-on-drift: the report, plots and predictions are written
    and logged, the summary says drift, the exit code is 3, and the registry is exactly as before."""
    from mlflow.tracking import MlflowClient

    env = local.env
    client = s3_client(env)
    client.create_bucket(Bucket="incoming")
    shifted = tmp_path / "inverted"
    shifted.mkdir()
    for path in sorted(local.images.glob("*.jpeg")):
        Image.fromarray(255 - np.asarray(Image.open(path).convert("RGB"))).save(shifted / path.name)
        client.upload_file(str(shifted / path.name), "incoming", f"batch-7/{path.name}")
    registry = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    champion = str(registry.get_model_version_by_alias("chest-xray-classifier", "champion").version)
    before = _registry_state(env)
    result = _monitor(
        env, "--images", "s3://incoming/batch-7/", "--output", str(tmp_path / "report"), "--fail-on-drift"
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: drift detected: ")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"drift_detected", "p_value", "ood_fraction", "images"} <= summary.keys()
    assert summary["images"] == summary["readable"] == 20 and summary["model_version"] == champion
    assert summary["drift_detected"] is True and summary["p_value"] < 0.01 and summary["ood_fraction"] > 0.5
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"report.html", "report.json", "predictions.csv", "ood_scores.png", "acquisition.png"} <= written
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["ood_fraction"] == summary["ood_fraction"] and report["embedding"]["reference_images"] > 0
    # The batch was read through S3, and scored as the registered champion scores those files.
    table = pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert len(table) == 20 and table["path"].str.startswith("s3://incoming/batch-7/").all()
    files = [shifted / p.rsplit("/", 1)[1] for p in table["path"]]
    np.testing.assert_allclose(table["probability"], champion_probabilities(env, files), atol=1e-5)
    experiment = registry.get_experiment_by_name("chest-xray-monitoring")
    run = registry.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    assert run.data.metrics["ood_fraction"] == pytest.approx(summary["ood_fraction"])
    assert {a.path for a in registry.list_artifacts(run.info.run_id, "monitoring")} >= {
        "monitoring/report.html",
        "monitoring/report.json",
        "monitoring/ood_scores.png",
    }
    assert _registry_state(env) == before


# -- DICOM: the hospital's own files through every entry point, and no patient data in any store ----------------


def _dicom_copies(images: list, folder, sentinels: bool = True) -> dict:
    """A DICOM of each JPEG, the encodings in turn (every third without an extension, every fourth MONOCHROME1);
    returns {DICOM file: its JPEG}."""
    from fixtures.dicom_factory import SYNTAXES, radiograph

    syntaxes = sorted(SYNTAXES)
    made = {}
    for index, path in enumerate(images):
        syntax = syntaxes[index % len(syntaxes)]
        bits = 8 if syntax == "jpeg-baseline" else (12, 16)[index % 2]
        photometric = "MONOCHROME1" if index % 4 == 3 else "MONOCHROME2"
        name = f"{path.stem}-{syntax}" + ("" if index % 3 == 0 else ".dcm")
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(
            radiograph(
                path.read_bytes(),
                bits=bits,
                syntax=syntax,
                photometric=photometric,
                sentinels=sentinels,
                PatientID=f"ZZSENTINELPID77-{index}" if sentinels else f"P{index}",
            )
        )
        made[target] = path
    return made


def _assert_no_sentinel(home, *streams):
    from fixtures.dicom_factory import SENTINELS

    parts = {part for value in SENTINELS.values() for part in [value, *value.split("^")]}
    for stream in streams:
        assert not [part for part in parts if part in stream], "a sentinel in an output stream"
    searched = 0
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".parquet":  # compressed columns (the prediction log, ZenML's tables): their values
                data += pd.read_parquet(path).to_csv(index=False).encode()
            searched += 1
            assert not [part for part in parts if part.encode() in data], f"a sentinel in {path}"
    assert searched > 10


def _prediction_log(home) -> tuple:
    """The local stack's prediction log (<artifact store>/prediction_log): its root and every row in it."""
    from xray.monitoring.prediction_log import read_log

    parts = sorted(home.rglob("prediction_log/date=*/*.parquet"))
    assert parts, "batch inference logs every prediction in the artifact store"
    root = parts[0].parents[1]
    return root, read_log(str(root))


def test_dicom_batches_mix_with_jpeg_are_scoped_and_leak_no_patient_data(local, tmp_path):
    """A folder of the twenty JPEGs, a DICOM of each in every encoding (some without an extension), and adult,
    lateral, CT, non-chest and broken DICOMs, every identifying tag planted with a sentinel: one row per file, each
    DICOM within 0.02 of its JPEG, the wrong ones out of scope or unreadable with a reason, exit 0 for inference and
    monitoring; then no sentinel in any output stream, file or store (ZenML, MLflow, the run's outputs)."""
    from pydicom.data import get_testdata_file

    from fixtures.dicom_factory import radiograph, with_sentinels

    env = local.env
    folder = tmp_path / "hospital-batch"  # the inputs hold the sentinels; every store and output is under home
    jpegs = sorted(local.images.glob("*.jpeg"))
    for path in jpegs:
        (folder / "jpeg").mkdir(parents=True, exist_ok=True)
        (folder / "jpeg" / path.name).write_bytes(path.read_bytes())
    made = _dicom_copies(jpegs, folder / "pacs" / "export")
    first = jpegs[0].read_bytes()
    wrong = {
        "adult.dcm": (radiograph(first, sentinels=True, age="045Y"), "PatientAge 045Y outside the validated 1-5 years"),
        "lateral": (radiograph(first, sentinels=True, view="LL"), "ViewPosition LL outside the validated PA, AP"),
        "ct.dcm": (with_sentinels(get_testdata_file("CT_small.dcm")), "Modality CT outside the validated CR, DX"),
        "hand.dcm": (radiograph(first, sentinels=True, body_part="HAND"), "BodyPartExamined HAND outside"),
        "broken.dcm": (radiograph(first, sentinels=True)[:-4000], "cannot decode DICOM"),
    }
    for name, (data, _) in wrong.items():
        (folder / "wrong" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "wrong" / name).write_bytes(data)
    output = local.home / "hospital-out"
    inference = run_command(
        [
            ROOT / "run.py",
            "--pipeline",
            "inference",
            "--images",
            folder,
            "--output",
            output / "preds.csv",
            "--explain",
            "2",
        ],
        env,
        900,
    )
    summary = summary_of(inference)
    table = pd.read_csv(output / "preds.csv", keep_default_na=False)
    assert len(table) == 20 + len(made) + len(wrong) == summary["rows_written"]
    by_path = table.set_index("path")
    for dicom_file, jpeg in made.items():
        row, original = by_path.loc[str(dicom_file)], by_path.loc[str(folder / "jpeg" / jpeg.name)]
        assert abs(float(row["probability"]) - float(original["probability"])) <= 0.02, dicom_file.name
        assert row["sop_instance_uid"].startswith("1.2.") and original["sop_instance_uid"] == ""
    for name, (_, reason) in wrong.items():
        row = by_path.loc[str(folder / "wrong" / name)]
        expected = "unreadable" if name == "broken.dcm" else "out_of_scope"
        assert row["status"] == expected and row["reason"].startswith(reason) and row["label"] == "", name
    assert summary["out_of_scope"] == 4 and summary["unreadable"] == 1
    monitoring = _monitor(env, "--images", str(folder), "--output", str(local.home / "hospital-report"))
    assert monitoring.returncode == 0, monitoring.stderr[-3000:]
    _, log = _prediction_log(local.home)
    logged = log[log["input"] == str(folder)]
    assert len(logged) == len(table) == summary["prediction_log_rows"]
    assert set(logged["sop_instance_uid"]) >= set(table["sop_instance_uid"]) and (logged["source"] == "batch").all()
    _assert_no_sentinel(local.home, inference.stdout, inference.stderr, monitoring.stdout, monitoring.stderr)


def test_a_dicom_site_is_evaluated_like_its_jpegs(local, tmp_path):
    """The mini archive's 47 test images as DICOM under NORMAL/ and PNEUMONIA/ at some depth, every encoding, some
    without an extension: --pipeline evaluation reads them all, and the AUC is the JPEGs' AUC."""
    from sklearn.metrics import roc_auc_score

    env = local.env
    jpegs = tmp_path / "jpegs"
    with zipfile.ZipFile(MINI_ZIP) as archive:
        for name in archive.namelist():
            if name.startswith("chest_xray/test/") and name.endswith(".jpeg"):
                target = jpegs / name.split("/")[-2] / name.rsplit("/", 1)[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    champion = str(mlflow_client(env).get_model_version_by_alias("chest-xray-classifier", "champion").version)
    site = tmp_path / "site"
    made = {}
    for label in ("NORMAL", "PNEUMONIA"):
        made |= _dicom_copies(sorted((jpegs / label).iterdir()), site / "dicom" / "2026" / label, sentinels=False)
    result = run_command(
        [
            ROOT / "run.py",
            "--pipeline",
            "evaluation",
            "--model-version",
            champion,
            "--config",
            local.config,
            "--dataset-uri",
            site,
            "--site",
            "dicom-site",
        ],
        env,
        900,
    )
    summary = summary_of(result)
    assert summary["images"] == 47 == len(made) and summary["model_version"] == champion
    paths = sorted(made.values())
    labels = [int(p.parent.name == "PNEUMONIA") for p in paths]
    # The JPEGs through the registered model (no calibration refit: the evaluation reports the version as registered).
    expected = roc_auc_score(labels, champion_probabilities(env, paths))
    assert summary["metrics"]["auc"] == pytest.approx(expected, abs=0.02)


@pytest.fixture(scope="module")
def pacs_e2e(local, tmp_path_factory):
    """make pacs's Orthanc on its own port and storage, for the inference pipeline's write-back (both tests below):
    the PACS and the run's environment with its credentials (also in this process's, for the test's own client)."""
    import os

    from test_pacs import PASSWORD

    from infra.pacs import Pacs
    from xray.storage import dicomweb

    pacs = Pacs(state=tmp_path_factory.mktemp("pacs-e2e"), port=free_port(), password=PASSWORD)
    env = local.env | {dicomweb.USER_ENV: pacs.user, dicomweb.PASSWORD_ENV: PASSWORD}
    saved = {key: os.environ.get(key) for key in (dicomweb.USER_ENV, dicomweb.PASSWORD_ENV)}
    os.environ.update({dicomweb.USER_ENV: pacs.user, dicomweb.PASSWORD_ENV: PASSWORD})
    try:
        pacs.up(die_with_parent=True)
        yield pacs, env
    finally:
        pacs.down()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_inference_reads_a_pacs_and_writes_one_report_per_image_back(local, pacs_e2e):
    """A mix of studies stowed, one `--pipeline inference --images dicomweb://... --write-back` leaves exactly one SR
    per analysed image, the same command with `--resume` adds none, and neither the PACS password nor an identifying
    value of the images (stow_mix plants sentinels) appears in any output stream, file or store (ZenML, MLflow, the
    predictions). It lists the whole PACS: it runs first of the two."""
    from test_pacs import PASSWORD, reports_in, stow_mix

    from xray.storage import dicomweb

    pacs, env = pacs_e2e
    made = stow_mix(pacs)
    output = local.home / "pacs-out" / "preds.csv"
    command = [ROOT / "run.py", "--pipeline", "inference", "--images", pacs.dicomweb, "--output", output]
    first = run_command([*command, "--write-back"], env, 900)
    summary = summary_of(first)
    analysed = len(made) - 1  # the structured report is skipped
    assert summary["rows_written"] == analysed and summary["reports_written"] == analysed
    assert summary["skipped"] == {dicomweb.NOT_AN_IMAGE: 1}
    assert len(reports_in(pacs)) == analysed
    again = summary_of(run_command([*command, "--write-back", "--resume"], env, 900))
    assert again["reports_written"] == 0 and len(reports_in(pacs)) == analysed
    for stream in (first.stdout, first.stderr):
        assert PASSWORD not in stream
    for path in local.home.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), f"the PACS password in {path}"
    _assert_no_sentinel(local.home, first.stdout, first.stderr)


def test_inference_with_heatmaps_writes_each_ok_image_its_heatmaps_and_resume_adds_nothing(local, pacs_e2e, tmp_path):
    """The acceptance of issue #42 through the CLI and the pipeline: a study of four radiographs (one an adult's, out
    of scope; sentinels in every identifying tag) and `infer --images dicomweb://...?StudyInstanceUID=S --write-back
    --heatmaps`: one report per image and a Segmentation and a Secondary Capture per `ok` image, in the study, each
    referring to its source; dciodvfy finds no error in any of them and dcmjs reads TID 1500, the source instance, the
    finding and the probability from each report. `--resume` stores nothing (the captures it now lists are its own)."""
    import pydicom
    from test_pacs import objects_in, some_jpegs

    from dicom_tools import dciodvfy_errors, dcmjs_reports
    from fixtures.dicom_factory import radiograph
    from xray.storage import dicomweb

    pacs, env = pacs_e2e
    study = pydicom.uid.generate_uid()
    client = dicomweb.Client(dicomweb.parse(pacs.dicomweb))
    for index, jpeg in enumerate(some_jpegs(4)):
        age = "045Y" if index == 3 else "003Y"
        client.store([radiograph(jpeg, age=age, sentinels=True, StudyInstanceUID=study, PatientID="P42")])
    output = local.home / "pacs-heatmaps" / "preds.csv"  # under the stores searched for sentinels below
    command = [ROOT / "run.py", "infer", "--images", f"{pacs.dicomweb}?StudyInstanceUID={study}", "--output", output]
    first = run_command([*command, "--write-back", "--heatmaps"], env, 900)
    summary = summary_of(first)
    table = pd.read_csv(output, keep_default_na=False, dtype=str).set_index("sop_instance_uid")
    ok = set(table.index[table["status"] == "ok"])
    assert len(table) == 4 and 0 < len(ok) < 4  # the adult's image is out of scope
    assert summary["reports_written"] == 4 and summary["heatmaps_written"] == len(ok)
    written = {kind: [o for o in found if o[0].StudyInstanceUID == study] for kind, found in objects_in(pacs).items()}
    assert {kind: len(found) for kind, found in written.items()} == {"SR": 4, "SEG": len(ok), "OT": len(ok)}
    seg_sources = {
        d.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID for d, _ in written["SEG"]
    }
    assert seg_sources == ok
    assert {d.SourceImageSequence[0].ReferencedSOPInstanceUID for d, _ in written["OT"]} == ok
    paths = []
    for kind, found in written.items():
        for dataset, data in found:
            paths.append(tmp_path / f"{kind}-{dataset.SOPInstanceUID}.dcm")
            paths[-1].write_bytes(data)
    assert not {path.name: errors for path in paths if (errors := dciodvfy_errors(path))}
    for read in dcmjs_reports([path for path in paths if path.name.startswith("SR-")]):
        ((group,),) = [read["groups"]]
        source, codes = group["sourceSOPInstanceUID"], {c["concept"]["value"] for c in group["codes"]}
        assert read["template"] == "1500" and source in table.index
        if source in ok:
            assert "233604007" in codes  # SNOMED CT Pneumonia, present or absent
            assert group["numbers"][0]["value"] == pytest.approx(float(table.loc[source, "probability"]), abs=1e-6)
        else:
            assert "233604007" not in codes and group["numbers"] == []
    resumed = run_command([*command, "--write-back", "--heatmaps", "--resume"], env, 900)
    again = summary_of(resumed)
    assert again["reports_written"] == again["heatmaps_written"] == 0 and again["own_captures_skipped"] == len(ok)
    after = {kind: [o for o in found if o[0].StudyInstanceUID == study] for kind, found in objects_in(pacs).items()}
    assert {kind: len(found) for kind, found in after.items()} == {kind: len(found) for kind, found in written.items()}
    # The PACS objects carry the patient and study modules by design (in tmp_path); nothing else does.
    _assert_no_sentinel(local.home, first.stdout, first.stderr, resumed.stdout, resumed.stderr)


def test_the_dicom_node_takes_studies_from_storescu_and_orthanc_and_reports_each_image_once(local, tmp_path):
    """`run.py node` on the local stack's champion, with a loopback C-STORE destination and Orthanc over STOW-RS:
    dcmtk's storescu sends a study (and a calling AE not allowed is refused), Orthanc (as a client, its DICOM server
    off) pushes one through REST /modalities/{id}/store, and a third study is cut by `kill -9` and finished after a
    restart. Every image is reported once at each destination and logged once in the stack's prediction log; no
    identifying value anywhere in the stores, the streams or the spool's records."""
    import base64
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from test_pacs import PASSWORD, reports_in

    from infra.pacs import Pacs
    from node_tools import Destination, no_sentinel_in, study, tree_text, uids
    from xray.storage import dicomweb

    pacs = Pacs(state=tmp_path / "pacs", port=free_port(), password=PASSWORD)
    env = local.env | {dicomweb.USER_ENV: pacs.user, dicomweb.PASSWORD_ENV: PASSWORD, "TMPDIR": str(tmp_path)}
    destination, port, spool = Destination(), free_port(), tmp_path / "spool"
    command = [sys.executable, ROOT / "run.py", "node", "--port", str(port), "--spool", spool, "--stable-seconds", "3"]
    command += ["--destination", destination.uri, "--destination", pacs.dicomweb, "--allow", "MODALITY,ORTHANC"]
    stderr = tmp_path / "node.stderr"

    def start():
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(stderr, "ab"), text=True
        )
        echo = ["echoscu", "-aet", "MODALITY", "-aec", "XRAY_AI", "127.0.0.1", str(port)]
        deadline = time.monotonic() + 300
        while subprocess.run(echo, capture_output=True, timeout=60).returncode != 0:
            assert process.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(1)
        return process

    def storescu(files, calling="MODALITY"):
        args = ["storescu", "-aet", calling, "-aec", "XRAY_AI", "127.0.0.1", str(port), *map(str, files)]
        return subprocess.run(args, capture_output=True, text=True, timeout=120)

    def wait_for(count):
        deadline = time.monotonic() + 180
        while len(destination.objects("SR")) < count:
            assert time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(0.5)

    def orthanc(method, path, body):
        request = urllib.request.Request(
            pacs.url + path,
            data=body if isinstance(body, bytes) else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": "Basic " + base64.b64encode(f"{pacs.user}:{PASSWORD}".encode()).decode()},
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            return json.loads(answer.read() or b"null")

    studies = {name: study(count) for name, count in (("storescu", 3), ("orthanc", 2), ("killed", 4))}
    for name, files in studies.items():
        for index, data in enumerate(files):
            (tmp_path / f"{name}-{index}.dcm").write_bytes(data)
    paths = {name: [tmp_path / f"{name}-{i}.dcm" for i in range(len(files))] for name, files in studies.items()}
    saved = {key: os.environ.get(key) for key in (dicomweb.USER_ENV, dicomweb.PASSWORD_ENV)}
    os.environ.update({dicomweb.USER_ENV: pacs.user, dicomweb.PASSWORD_ENV: PASSWORD})
    node = None
    try:
        pacs.up(die_with_parent=True)
        with destination.running():
            node = start()
            assert storescu(paths["storescu"]).returncode == 0
            refused = storescu(paths["storescu"][:1], calling="NOT_ALLOWED")
            assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr
            wait_for(3)
            ids = [orthanc("POST", "/instances", data)["ID"] for data in studies["orthanc"]]
            orthanc("PUT", "/modalities/xray-node", {"AET": "XRAY_AI", "Host": "127.0.0.1", "Port": port})
            pushed = orthanc("POST", "/modalities/xray-node/store", {"Resources": ids, "Synchronous": True})
            assert pushed["InstancesCount"] == 2 and pushed["FailedInstancesCount"] == 0
            wait_for(5)
            assert storescu(paths["killed"][:2]).returncode == 0
            node.send_signal(signal.SIGKILL)
            node.wait(timeout=60)
            node = start()
            assert storescu(paths["killed"][1:]).returncode == 0
            wait_for(9)
            node.send_signal(signal.SIGTERM)
            out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, stderr.read_text()[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        sent = {uids(data)[1] for files in studies.values() for data in files}
        at_destination = [
            report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            for report in destination.objects("SR")
        ]
        assert sorted(ref.ReferencedSOPInstanceUID for ref in at_destination) == sorted(sent)
        assert all(len(items) == 1 for items in destination.received.values())
        in_pacs = reports_in(pacs)
        assert (
            len(in_pacs) == 9
            and {
                r.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence[0]
                .ReferencedSOPSequence[0]
                .ReferencedSOPInstanceUID
                for r in in_pacs
            }
            == sent
        )
        _, log = _prediction_log(local.home)
        node_rows = log[log["source"] == "node"]
        assert sorted(node_rows["sop_instance_uid"]) == sorted(sent) and summary["dead_letters"] == 0
        assert not list(spool.glob("studies/*/*.dcm"))
        streams = stderr.read_text()
        assert "'NOT_ALLOWED' at 127.0.0.1" in streams and PASSWORD not in streams
        no_sentinel_in(tree_text(spool))
        _assert_no_sentinel(local.home, out, streams)
    finally:
        if node is not None and node.poll() is None:
            node.kill()
        pacs.down()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


SERVE_A_REQUEST = """
import base64, pathlib, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/chest-xray-classifier@champion")
images = [base64.b64encode(p.read_bytes()).decode() for p in sorted(pathlib.Path(sys.argv[1]).glob("*.jpeg"))]
print(len(model.predict(pd.DataFrame({"image": images}))))
"""


def test_two_batches_and_serving_meet_their_labels_and_a_week_that_went_wrong_alerts(local, tmp_path):
    """Two inference runs and a served request land in the prediction log; the first run's part is moved a week
    back. A labels file whose findings run against the model that week and with it the week after: the feedback run
    reports both weeks with intervals, exports the labelled batch images as sources, logs to MLflow, and with
    --fail-on-degradation exits 4 with one line per alert, each naming the first week; unmatched and conflicting
    labels are counted."""
    from datetime import datetime, timedelta, timezone

    from mlflow.tracking import MlflowClient

    from xray.monitoring.performance.feedback import period_of

    env = local.env
    folders = {name: tmp_path / name for name in ("week-a", "week-b", "serving")}
    with zipfile.ZipFile(FULL_ZIP) as archive:
        test = sorted(n for n in archive.namelist() if "/test/" in n and n.endswith(".jpeg"))
        normal, pneumonia = [n for n in test if "/NORMAL/" in n], [n for n in test if "/PNEUMONIA/" in n]
        chosen = {"week-a": normal[:60] + pneumonia[:60], "week-b": normal[60:90] + pneumonia[60:90]}
        chosen["serving"] = normal[90:94] + pneumonia[90:94]
        for name, entries in chosen.items():
            folders[name].mkdir()
            for entry in entries:  # re-encoded: bytes (and sha256) no other test has predicted
                image = Image.open(io.BytesIO(archive.read(entry))).convert("RGB")
                image.save(folders[name] / entry.rsplit("/", 1)[1], quality=92)
    tables = {}
    for name in ("week-a", "week-b"):
        output = tmp_path / f"{name}.csv"
        result = run_command(
            [ROOT / "run.py", "--pipeline", "inference", "--images", folders[name], "--output", output], env, 900
        )
        assert summary_of(result)["prediction_log_rows"] == len(chosen[name])
        tables[name] = pd.read_csv(output, keep_default_na=False)
    root, _ = _prediction_log(local.home)
    served = run_command(["-c", SERVE_A_REQUEST, folders["serving"]], env | {"XRAY_PREDICTION_LOG": str(root)}, 600)
    assert served.returncode == 0 and served.stdout.strip() == "8", served.stderr[-3000:]

    # The first run's part, a week back: what the log holds for a batch predicted last week.
    now = datetime.now(timezone.utc)
    for part in sorted(root.glob("date=*/*.parquet")):
        rows = pd.read_parquet(part)
        if (rows["input"] == str(folders["week-a"])).all():
            rows["time"] = rows["time"] - pd.Timedelta(days=7)
            moved = root / f"date={rows['time'].iloc[0]:%Y-%m-%d}" / part.name
            moved.parent.mkdir(exist_ok=True)
            rows.to_parquet(moved, index=False)
            part.unlink()
    _, log = _prediction_log(local.home)
    assert (log["source"] == "serving").sum() >= 8 and (log["input"] == str(folders["week-a"])).sum() == 120
    week_a, week_b = period_of(pd.Series([now - timedelta(days=7), now]), "week").tolist()

    # Labels: last week the readers' findings run against the model's ranking (its AUC collapses); this week they
    # follow it. (The smoke model calls every image PNEUMONIA at its threshold of a near-random val, so no pneumonia
    # can be missed here: the sensitivity alert is measured in tests/xray/monitoring/test_feedback.py.)
    def read(table, agree: bool):
        answered = table[table["status"] == "ok"].sort_values("probability", kind="stable")
        upper = np.arange(len(answered)) >= len(answered) // 2
        findings = np.where(upper == agree, "PNEUMONIA", "NORMAL")
        return pd.DataFrame({"sha256": answered["sha256"], "label": findings})

    served_rows = log[log["source"] == "serving"].drop_duplicates("sha256")
    conflicting = served_rows.loc[served_rows["status"] == "ok", "sha256"].iloc[0]
    labels = pd.concat(
        [
            read(tables["week-a"], agree=False),
            read(tables["week-b"], agree=True),
            read(served_rows, agree=True),
            pd.DataFrame({"sha256": ["0" * 64, "1" * 64, conflicting], "label": ["NORMAL", "NORMAL", "?"]}),
        ],
        ignore_index=True,
    )
    first = labels.index[labels["sha256"] == conflicting][0]
    labels.iloc[-1, 1] = "NORMAL" if labels.loc[first, "label"] == "PNEUMONIA" else "PNEUMONIA"
    answered = {name: int((t["status"] == "ok").sum()) for name, t in tables.items()}
    labels_path = tmp_path / "labels.csv"
    labels.to_csv(labels_path, index=False)
    config = yaml.safe_load(local.config.read_text())
    config.setdefault("monitoring", {})["feedback_min_per_class"] = 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    output = tmp_path / "feedback"
    result = run_command(
        [
            ROOT / "run.py",
            "--pipeline",
            "feedback",
            "--config",
            tmp_path / "config.yaml",
            "--labels",
            labels_path,
            "--output",
            output,
            "--fail-on-degradation",
        ],
        env,
        900,
    )
    assert result.returncode == 4, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(f"period {week_a}," in line for line in errors), errors
    assert any(line.startswith(f"error: AUC degraded in period {week_a}, site (none), v") for line in errors), errors
    assert summary["unmatched_labels"] == 2 and summary["conflicting_labels"] == 1
    served_answered = int((served_rows["status"] == "ok").sum())
    assert summary["labelled_predictions"] == answered["week-a"] + answered["week-b"] + served_answered - 1
    performance = pd.read_csv(output / "performance.csv", keep_default_na=False)
    assert performance["period"].tolist() == [week_a, week_b]
    bad, good = performance.iloc[0], performance.iloc[1]
    assert bad["auc"] < 0.2 and bad["auc_low"] <= bad["auc"] <= bad["auc_high"] < 0.5, bad.to_dict()
    assert good["auc"] > 0.9 and good["positives"] >= 3 and good["negatives"] >= 3
    assert bad["sensitivity_low"] <= bad["sensitivity"] <= bad["sensitivity_high"]
    assert {"auc_low", "auc_high", "ece", "share_out_of_distribution"} <= set(performance.columns)
    assert (output / "feedback_sensitivity.png").stat().st_size > 10_000
    sources = yaml.safe_load((output / "sources.yaml").read_text())["data"]["sources"]
    assert sorted(s["uri"] for s in sources) == sorted(str(folders[n]) for n in ("week-a", "week-b"))
    assert summary["labelled_without_stored_image"] == served_answered - 1  # served: never stored
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("chest-xray-feedback")
    runs = client.search_runs([experiment.experiment_id])
    assert any(run.data.tags.get("degraded") == "true" for run in runs)
    # Feedback puts the estimate of the same predictions beside the realised metrics, one plot per metric.
    both = pd.read_csv(output / "estimated_vs_realised.csv", keep_default_na=False)
    assert both["period"].tolist() == [week_a, week_b] and {"estimated_auc_low", "auc_high", "verdict"} <= set(both)
    assert (output / "estimated_auc.png").stat().st_size > 10_000

    # Before any label: monitor --from-log (the earlier form, --pipeline monitoring) estimates every week, site and
    # version of the same log. No labels file exists any more, and the command takes none.
    labels_path.unlink()
    estimated = run_command(
        [
            ROOT / "run.py",
            "--pipeline",
            "monitoring",
            "--from-log",
            "--config",
            tmp_path / "config.yaml",
            "--output",
            tmp_path / "estimated",
        ],
        env,
        900,
    )
    summary = summary_of(estimated)
    groups = {(e["period"], e["site"]): e for e in summary["estimates"]}
    assert {(week_a, ""), (week_b, "")} <= set(groups) and summary["estimated_groups"] == len(summary["estimates"])
    week = groups[(week_a, "")]
    assert week["verdict"] in ("reliable", "unreliable") and (week["verdict"] == "reliable") == (not week["reasons"])
    assert week["answered"] == answered["week-a"]  # the smoke model's week: which estimates are defined varies
    printed = [
        re.sub(r"\x1b\[[0-9;]*m", "", line).strip()  # the console's colours
        for line in estimated.stderr.splitlines()
        if f"estimated period {week_a}, site (none), v" in line
    ]
    assert len(printed) == 1 and f": {week['answered']} answered; " in printed[0], printed
    shown = [m for m in ("sensitivity", "specificity", "ppv", "npv", "auc") if week[f"estimated_{m}"] is not None]
    assert shown, week  # the smoke model's week: at least the metrics whose estimate is finite, each with its band
    for m in shown:
        band = f"{m} {week[f'estimated_{m}']:.3f} ({week[f'estimated_{m}_low']:.3f}-{week[f'estimated_{m}_high']:.3f})"
        assert band in printed[0], (band, printed[0])
        assert 0 <= week[f"estimated_{m}_low"] <= week[f"estimated_{m}_high"] <= 1
    assert printed[0].endswith(week["verdict"] + (f": {week['reasons']}" if week["reasons"] else "")), printed[0]
    assert {"estimates.csv", "report.json", "estimated_sensitivity.png"} <= {
        p.name for p in (tmp_path / "estimated").iterdir()
    }
    experiment = client.get_experiment_by_name("chest-xray-monitoring")
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    # Every finite estimate of the week is a series (an undefined one, such as the AUC of a week of one called class,
    # is not logged), and so is its verdict.
    for name in ["reliable", *shown]:
        assert any(key.startswith(f"estimated_{name}/no-site/v") for key in run.data.metrics), (name, run.data.metrics)


def test_sharded_inference_fans_out_steps_and_writes_the_rows_of_one_run(local, tmp_path):
    """--shards 3: three predict steps in the run, each its own part beside the output, merged into it; every image
    once, scored as the champion scores it; a rerun with --resume predicts nothing again."""
    env = local.env
    output = tmp_path / "out" / "preds.parquet"
    command = [
        ROOT / "run.py",
        "--pipeline",
        "inference",
        "--images",
        local.images,
        "--output",
        output,
        "--shards",
        "3",
    ]
    summary = summary_of(run_command(command, env, 900))
    table = pd.read_parquet(output)
    assert summary["shards"] == 3 and summary["rows_written"] == len(table) == 20 == summary["images"]
    assert sorted(table["path"]) == sorted(str(p) for p in local.images.glob("*.jpeg"))
    parts = [output.with_name(f"preds.part-{i}-of-3.parquet") for i in range(3)]
    assert summary["parts"] == [str(p) for p in parts] and sum(len(pd.read_parquet(p)) for p in parts) == 20
    np.testing.assert_allclose(table["probability"], champion_probabilities(env, table["path"]), atol=1e-5)
    script = "import sys; from zenml.client import Client; print(sorted(Client().get_pipeline_run(sys.argv[1]).steps))"
    steps = run_command(["-c", script, summary["pipeline_run_id"]], env, 120)
    expected = "['merge_predictions', 'predict_batch_0', 'predict_batch_1', 'predict_batch_2', 'resolve_model_version']"
    assert steps.stdout.strip() == expected, steps.stderr[-2000:]
    again = summary_of(run_command([*command, "--resume"], env, 900))
    assert again["skipped_already_predicted"] == 20 and again["rows_written"] == 20


def test_batch_inference_runs_on_the_runtime_this_cpu_gets(local, tmp_path, monkeypatch):
    """inference.runtime auto (the default; the other tests pin keras): OpenVINO in bf16 where the CPU has BF16, else
    Keras. The summary and the MLflow run say which ran, and the probabilities stay those of the champion (to 0.05 in
    bf16, above the 0.044 measured on the 128-px version's test split; to 1e-5 on Keras)."""
    from xray.serving.predictor import choose_runtime

    env = local.env | {"XRAY_INFERENCE_RUNTIME": "auto"}
    output = tmp_path / "preds.csv"
    command = [ROOT / "run.py", "--pipeline", "inference", "--images", local.images, "--output", output]
    summary = summary_of(run_command(command, env, 900))
    monkeypatch.setenv("XRAY_INFERENCE_RUNTIME", "auto")  # this process pins keras (conftest), as the run does not
    runtime, precision = choose_runtime("auto")
    assert summary["runtime"] == f"{runtime} {precision}"
    table = pd.read_csv(output)
    tolerance = 0.05 if precision == "bf16" else 1e-5  # bf16: at most 0.044 on the 128-px version (BENCHMARKS)
    np.testing.assert_allclose(table["probability"], champion_probabilities(env, table["path"]), atol=tolerance)
    client = mlflow_client(env)
    experiment = client.get_experiment_by_name("chest-xray-inference").experiment_id
    latest = client.search_runs([experiment], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert latest.data.params["runtime"] == summary["runtime"]
