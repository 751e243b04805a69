"""A registered version's folder (xray.serving.bundle): what registration writes is what serving loads, from the
version's own code/ and without the project installed; versions registered before the stages still load."""

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from support import mlflow_store, png, radiograph_like
from xray.registry import store
from xray.serving import bundle

pytestmark = pytest.mark.slow

MODEL = "bundle-test"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, predictor):
    """The session's tiny predictor registered in a SQLite MLflow of its own; (the version's folder, its store)."""
    home = tmp_path_factory.mktemp("bundle")
    uri = mlflow_store(home)
    client = MlflowClient(uri)
    experiment = client.create_experiment("bundle", artifact_location=(home / "artifacts").as_uri())
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment):
            metadata = {"threshold": predictor.threshold, "image_size": predictor.image_size, "preprocessing": "test"}
            _, version = store.log_and_register(
                bundle.VersionFiles(predictor.model, predictor.profile), MODEL, metadata, "# card"
            )
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{version}", dst_path=str(home / "v")))
    finally:
        mlflow.set_tracking_uri(None)
    return folder


IMAGE = png(radiograph_like(np.random.default_rng(3)))


def request() -> pd.DataFrame:
    """What the scoring server hands the model for {"inputs": [...]}: the signature's ``image`` column."""
    return pd.DataFrame({"image": [base64.b64encode(IMAGE).decode()]})


LOAD = textwrap.dedent("""
    import json, sys
    folder, code = sys.argv[1], sys.argv[2]
    import mlflow.pyfunc, pandas as pd
    model = mlflow.pyfunc.load_model(folder)
    import xray
    rows = model.predict(pd.DataFrame({"image": json.loads(sys.argv[3])}))
    print(json.dumps({"xray": xray.__file__, "rows": rows.astype(object).where(rows.notna(), None).to_dict("records")}))
""")


def load_in_a_clean_process(folder: Path, tmp_path: Path) -> dict:
    """mlflow.pyfunc.load_model in a fresh interpreter run from an empty folder in isolated mode: the loader puts the
    version's code/ first on sys.path, ahead of the project's editable install (a finder consulted after the path)."""
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_", "ZENML_"))}
    # -I: isolated mode (no cwd, no PYTHONPATH, no user site); -S would also drop site-packages, which TF needs.
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), str(folder / "code"), json.dumps(request()["image"].tolist())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_registered_version_carries_the_whole_package(registered):
    carried = ("__init__.py", "serving/pyfunc.py", "serving/bundle.py", "data/images.py", "config/limits.py")
    for relative in (f"xray/{name}" for name in carried):
        assert (registered / "code" / relative).is_file(), relative
    flavor = yaml.safe_load((registered / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == bundle.LOADER_MODULE == "xray.serving.pyfunc" and flavor["code"] == "code"
    assert (registered / "data" / bundle.CONFIG_FILE).is_file() and (registered / "data" / bundle.PROFILE_DIR).is_dir()


def test_the_version_serves_from_its_own_code_without_the_project_installed(registered, tmp_path, predictor):
    """The editable install would mask a code/ folder that misses a module: here only code/ can supply xray."""
    answer = load_in_a_clean_process(registered, tmp_path)
    assert answer["xray"].startswith(str(registered / "code")), answer["xray"]
    expected = predictor.predict_bytes([IMAGE]).iloc[0]
    row = answer["rows"][0]
    assert row["status"] == expected["status"] and row["probability"] == pytest.approx(expected["probability"])


def test_a_version_registered_before_the_stages_still_loads_and_serves(registered, tmp_path, predictor):
    """Versions registered by the flat layout name ``xray.serving`` as their loader; the data folder is unchanged.
    They load where the new package is imported (batch inference, the gate) and from their code/ alone."""
    old = tmp_path / "old"
    shutil.copytree(registered, old)
    mlmodel = yaml.safe_load((old / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["loader_module"] = "xray.serving"
    (old / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    served = mlflow.pyfunc.load_model(str(old)).predict(request())  # this process: xray imported already
    expected = predictor.predict_bytes([IMAGE])
    assert served["probability"].tolist() == pytest.approx(expected["probability"].tolist())
    assert load_in_a_clean_process(old, tmp_path)["rows"][0]["status"] == expected["status"][0]
    read = bundle.read(old / "data")  # what load_predictor does with a version's folder
    assert read.threshold == predictor.threshold and read.profile is not None


def test_a_sites_operating_point_is_served_from_training_and_from_a_later_recalibration(tmp_path, predictor):
    """Training's points travel in serving.json; a point re-fitted later (--recalibrate-fraction) is written beside
    data/ in the logged model: both reach pyfunc serving (``params.site``) and batch inference (bundle.read)."""
    from mlflow.exceptions import MlflowException

    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    experiment = client.create_experiment("points", artifact_location=(tmp_path / "artifacts").as_uri())
    at_training = {"calibration": {"method": "platt", "temperature": 2.0, "bias": 0.5}, "threshold": 0.7}
    later = {"calibration": {"method": "temperature", "temperature": 0.5, "bias": 0.0}, "threshold": 0.2}
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment):
            metadata = {
                "threshold": predictor.threshold,
                "image_size": predictor.image_size,
                "preprocessing": "test",
                "operating_points": {"b": at_training},
            }
            _, version = store.log_and_register(
                bundle.VersionFiles(predictor.model, predictor.profile), "points-test", metadata, "# card"
            )
        store.save_operating_point(client, "points-test", version, "c", later)
        served = mlflow.pyfunc.load_model(f"models:/points-test/{version}")
        rows = {site: served.predict(request(), params={"site": site}).iloc[0] for site in ("b", "c", "")}
        with pytest.raises(MlflowException, match="no operating point for site 'd' \\(it has: b, c\\)"):
            served.predict(request(), params={"site": "d"})
        assert client.get_model_version("points-test", version).tags["operating_point.c"] == json.dumps(later)
    finally:
        mlflow.set_tracking_uri(None)
    assert (rows["b"]["operating_point"], rows["b"]["threshold"]) == ("site:b", 0.7)
    assert (rows["c"]["operating_point"], rows["c"]["threshold"]) == ("site:c", 0.2)
    assert (rows[""]["operating_point"], rows[""]["threshold"]) == ("version", predictor.threshold)
    p = rows[""]["probability"]
    z = np.log(p / (1 - p))
    assert rows["c"]["probability"] == pytest.approx(1 / (1 + np.exp(-z / 0.5)))
