"""xray.registry.promotion, the training pipeline's four registration steps, on a tiny model and a SQLite MLflow:
the first version is promoted, a challenger is gated on paired scores against the champion, a version the gate
rejects is registered but never takes the alias."""

import json
import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from support import cpu_reporting, dataset_entries, jpeg_bytes, mlflow_store, write_zip
from xray.config.data import DataConfig
from xray.config.evaluate import EvaluateConfig
from xray.config.pipeline import PipelineConfig
from xray.config.registry import RegistryConfig
from xray.config.train import Augmentation
from xray.data import inputs
from xray.data.dataset import prepare_dataset
from xray.evaluation.recipes import Evaluation, calibrate_and_evaluate
from xray.registry import card, decisions, gate, promotion
from xray.registry.store import load_predictor, load_reference_profile, update_model_card
from xray.serving import bundle

MODEL = "registration-test"


@pytest.fixture(scope="module")
def candidate(tmp_path_factory, profile):
    """A tiny Keras model, the validated synthetic dataset it is scored on, and the evaluation report it would have."""
    import keras

    folder = tmp_path_factory.mktemp("registration")
    archive = write_zip(folder / "a.zip", dataset_entries(per_class=10))
    dataset, report = prepare_dataset(archive, folder / "d", DataConfig(min_val_per_class=2, val_fraction=0.25), seed=0)
    spec = inputs.make_spec(dataset.manifest, 32, 8, Augmentation(), None, None, 0, "balanced")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")]
    )
    from xray.model.network import predict_paths

    scores = {}
    for split in ("val", "test"):
        rows = inputs.select(dataset.manifest, split, spec)
        scores[split] = (inputs.labels_of(rows), predict_paths(model, dataset.paths(rows), spec))
    evaluate = EvaluateConfig(bootstrap_samples=100, calibration="none", threshold_policy="fixed", fixed_threshold=0.02)
    logit = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))  # noqa: E731
    metrics = calibrate_and_evaluate(
        scores["val"][0], logit(scores["val"][1]), scores["test"][0], logit(scores["test"][1]), evaluate, seed=0
    )
    return {
        "model": model,
        "dataset": dataset,
        "spec": spec,
        "data_report": report.to_dict(),
        "metrics": {k: metrics[k] for k in ("flat", "val", "test", "threshold_policy", "test_uncalibrated")}
        | {"calibration": metrics["calibration"].as_dict()},
        "threshold": metrics["threshold"],
        "test_probabilities": scores["test"][1],
        "evaluate": evaluate,
        "profile": profile,
    }


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A SQLite MLflow store in tmp_path, as the tracking URI of this process (the gate loads the champion by URI)."""
    monkeypatch.chdir(tmp_path)  # a run's artifacts go under ./mlruns of the store's default experiment
    uri = mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def register(client, candidate, scope=None, **changes) -> promotion.Registration:
    """The training pipeline's four registration steps, in their order, on ``candidate`` (some parts changed)."""
    c = candidate | changes
    config = PipelineConfig(
        registry=c.get("registry", RegistryConfig(model_name=MODEL)), evaluate=c["evaluate"], seed=0
    ).model_copy(update={"scope": scope} if scope else {})
    evaluation = Evaluation(c["metrics"], c["threshold"], [], [float(p) for p in c["test_probabilities"]])
    spec = c["spec"]
    training = {"backbone": "tiny", "weights": "none", "epochs_run": 1, "image_size": spec.image_size}
    training |= {"preprocessing": spec.preprocessing, "class_weights": spec.class_weights, "counts": spec.counts}
    with tempfile.TemporaryDirectory() as workdir:
        sets, site_images = promotion.load_gate_sets(client, c["dataset"], spec, config, Path(workdir))
        scores = promotion.score_candidates(c["model"], c["dataset"], spec, sets, site_images, evaluation, config)
    rule = (config.evaluate.min_sensitivity, config.registry.margin, config.evaluate.bootstrap_samples, config.seed)
    decision = gate.decide_on(scores, evaluation.flat["test_sensitivity"], *rule)
    with mlflow.start_run():
        return promotion.register_and_promote(
            client,
            bundle.VersionFiles(c["model"], c["profile"], c.get("int8")),
            evaluation,
            decision,
            training | {"dataset_sha256": "ab" * 32},
            c["data_report"],
            config,
        )


def test_the_first_version_is_promoted_and_carries_its_metadata_card_and_run_tags(store, candidate):
    result = register(store, candidate)
    assert result.promoted and result.model_version == "1" and result.previous_champion is None
    assert "no champion" in result.reason and result.gate == {}
    assert str(store.get_model_version_by_alias(MODEL, "champion").version) == "1"
    tags = store.get_model_version(MODEL, "1").tags
    assert tags["threshold"] == str(candidate["threshold"]) and tags["dataset_sha256"] == "ab" * 32
    assert tags["image_size"] == "32" and tags["promotion_decision"] == "promoted"
    assert tags["ood_threshold"] == str(candidate["profile"].threshold)
    run = store.get_run(result.mlflow_run_id)
    assert run.data.tags["model_version"] == "1" and run.data.tags["promotion_decision"] == "promoted"
    card = mlflow.artifacts.load_text(run.data.tags["model_card"])  # the run links to the version's one card
    assert run.data.tags["model_card"] == f"models:/{MODEL}/1/model_card.md"
    assert "Backbone: tiny" in card and "## Promotion gate" in card
    assert f"{candidate['metrics']['flat']['test_auc']:.4f}" in card
    assert "model_card.md" not in {a.path for a in store.list_artifacts(result.mlflow_run_id)}  # no second copy
    described = store.get_model_version(MODEL, "1").description
    assert "## Test metrics" in described and len(described) <= 5000
    # The validated scope is stored with the version (what serving checks DICOM headers against) and in its card.
    assert "## Validated scope" in card and "ViewPosition: PA, AP" in card and "Age: 1 to 5 completed years" in card
    assert json.loads(tags["scope"])["modalities"] == ["CR", "DX"]
    serving = json.loads(mlflow.artifacts.load_text(f"models:/{MODEL}/1/data/serving.json"))
    assert serving["scope"]["age_years"] == [1, 5]


@pytest.mark.slow
def test_a_version_registered_with_int8_carries_it_sealed_and_says_so_in_its_card_and_tags(
    store, candidate, monkeypatch
):
    from xray.config.registry import Int8Config
    from xray.registry.store import DIGEST_TAG
    from xray.serving.runtimes import int8

    loose = Int8Config(max_drop=0.05, min_labels_unchanged=0.5)  # a model of random weights: the storage is checked
    made = int8.make(candidate["model"], candidate["dataset"], 32, candidate["threshold"], loose, seed=0)
    assert made.passed, made.reason
    splits = candidate["dataset"].manifest["split"].value_counts()
    assert made.images == {"calibration": splits["train"], "val": splits["val"]}  # all of train (under 300); never test
    failed = int8.Int8Outcome(None, "val AUC 0.9 lost more than 0.005", made.recipe, 0.95, 0.9, 1.0)

    passed = register(store, candidate, int8=made)
    tags = store.get_model_version(MODEL, passed.model_version).tags
    assert tags["int8"] == "passed" and DIGEST_TAG in tags
    listed = mlflow.artifacts.load_text(f"models:/{MODEL}/{passed.model_version}/files.sha256")
    assert "  data/int8/model.xml\n" in listed and "  data/int8/model.bin\n" in listed
    card_text = mlflow.artifacts.load_text(f"models:/{MODEL}/{passed.model_version}/model_card.md")
    assert f"AUC {made.val_auc_int8:.4f} against fp32 {made.val_auc_fp32:.4f}" in card_text
    predictor, _ = load_predictor(MODEL, passed.model_version)  # read whole: its download folder is gone
    with monkeypatch.context() as cpu:
        cpu_reporting(cpu, ["FP32", "INT8"])  # a CPU without BF16: auto runs the version's int8
        assert predictor.int8_ir is not None and predictor.use_runtime("auto") == "openvino int8"
    assert predictor.probabilities(np.full((2, 32, 32, 3), 128, np.float32)).shape == (2,)

    rejected = register(store, candidate, int8=failed)
    tags = store.get_model_version(MODEL, rejected.model_version).tags
    assert tags["int8"] == "failed: val AUC 0.9 lost more than 0.005"
    listed = mlflow.artifacts.load_text(f"models:/{MODEL}/{rejected.model_version}/files.sha256")
    assert "data/int8/int8.json" in listed and "model.xml" not in listed
    card_text = mlflow.artifacts.load_text(f"models:/{MODEL}/{rejected.model_version}/model_card.md")
    assert "int8 (OpenVINO, NNCF accuracy control): **none**: it failed its val control (val AUC 0.9" in card_text
    predictor, _ = load_predictor(MODEL, rejected.model_version)
    with monkeypatch.context() as cpu:
        cpu_reporting(cpu, ["FP32", "INT8"])
        assert predictor.int8_ir is None and predictor.use_runtime("auto") == "keras f32"

    off = register(store, candidate)  # registry.int8.enabled off: nothing made, said so
    assert store.get_model_version(MODEL, off.model_version).tags["int8"] == "not made"
    assert "- int8: not made" in mlflow.artifacts.load_text(f"models:/{MODEL}/{off.model_version}/model_card.md")


@pytest.mark.slow
def test_a_version_registered_without_int8_gets_it_on_request_on_its_own_split_only(store, candidate):
    from xray.config.registry import Int8Config
    from xray.errors import ConfigError
    from xray.registry.store import DIGEST_TAG

    old = register(store, candidate)  # int8 not made (registered with it off, or before it existed)
    digest = store.get_model_version(MODEL, old.model_version).tags[DIGEST_TAG]
    config = PipelineConfig(
        registry=RegistryConfig(model_name=MODEL, int8=Int8Config(max_drop=0.05, min_labels_unchanged=0.5))
    )
    trained_on = {"sites": {config.data.base_site: {"digest": "ab" * 32}}}
    elsewhere = {"sites": {config.data.base_site: {"digest": "cd" * 32}}}
    with pytest.raises(ConfigError, match="was trained on archive abababababab, not this one"):
        promotion.quantize_registered(store, old.model_version, candidate["dataset"], elsewhere, config)
    run_id = store.get_model_version(MODEL, old.model_version).run_id
    store.log_param(run_id, "data.val_fraction", "0.3")  # its run split val otherwise
    with pytest.raises(ConfigError, match=r"other data settings \(data.val_fraction\)"):
        promotion.quantize_registered(store, old.model_version, candidate["dataset"], trained_on, config)
    config = config.model_copy(update={"data": config.data.model_copy(update={"val_fraction": 0.3})})

    made = promotion.quantize_registered(store, old.model_version, candidate["dataset"], trained_on, config)
    assert made.passed, made.reason
    tags = store.get_model_version(MODEL, old.model_version).tags
    assert tags["int8"] == "passed" and tags[DIGEST_TAG] != digest  # sealed again, over its new files
    uri = f"models:/{MODEL}/{old.model_version}"
    assert "  data/int8/model.xml\n" in mlflow.artifacts.load_text(f"{uri}/files.sha256")
    card_text = mlflow.artifacts.load_text(f"{uri}/model_card.md")
    assert "- int8: not made" not in card_text and card_text.count("- int8 (OpenVINO") == 1
    assert card_text.index("- Training: ") < card_text.index("- int8 (OpenVINO") < card_text.index("## Training data")
    predictor, _ = load_predictor(MODEL, old.model_version)  # its new files verified against the new digest
    assert predictor.int8_ir is not None
    with pytest.raises(ConfigError, match="already carries an int8 model"):
        promotion.quantize_registered(store, old.model_version, candidate["dataset"], trained_on, config)


def test_a_configured_scope_is_the_one_the_version_serves_with(store, candidate):
    from xray.config.scope import ScopeConfig
    from xray.registry import store as registry_store

    adults = ScopeConfig(age_years=(18, 120), required=("PatientAge",))
    result = register(store, candidate, scope=adults)
    predictor, _ = registry_store.load_predictor(MODEL, result.model_version)
    assert predictor.scope == adults


def test_a_served_version_names_itself_in_every_answer(store, candidate):
    """The version number exists only once registered: registration writes it into the version's serving.json."""
    import base64

    import pandas as pd

    register(store, candidate)
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(
        pd.DataFrame({"image": [base64.b64encode(jpeg_bytes(7)).decode()]})
    )
    assert served["model_version"].tolist() == ["1"]


def test_a_challenger_is_scored_against_the_champion_on_the_same_images(store, candidate):
    register(store, candidate)
    result = register(store, candidate)  # the same model again: a paired difference of exactly zero
    assert result.previous_champion == "1" and result.model_version == "2"
    test = result.gate["test"]
    assert test["images"] == len(candidate["test_probabilities"]) and test["auc_difference"] == pytest.approx(0)
    assert result.promoted and "non-inferior to champion v1" in result.reason
    assert str(store.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert store.get_model_version(MODEL, "2").tags["gate.champion_version"] == "1"
    assert store.get_run(result.mlflow_run_id).data.metrics["gate_test_auc_difference"] == pytest.approx(0)


def test_a_rejected_version_is_registered_but_the_champion_stays(store, candidate):
    register(store, candidate)
    metrics = candidate["metrics"] | {"flat": candidate["metrics"]["flat"] | {"test_sensitivity": 0.5}}
    result = register(store, candidate, metrics=metrics)
    assert not result.promoted and "min_sensitivity" in result.reason
    assert result.model_version == "2" and str(store.get_model_version_by_alias(MODEL, "champion").version) == "1"
    tags = store.get_model_version(MODEL, "2").tags
    assert tags["promotion_decision"] == "rejected" and "min_sensitivity" in tags["promotion_reason"]


def test_registration_needs_an_active_run(store, candidate):
    decision = gate.decide_on(gate.Scores(None), 1.0, 0.95, 0.01, 100, 0)
    evaluation = Evaluation(candidate["metrics"], candidate["threshold"], [], [])
    with pytest.raises(RuntimeError, match="active MLflow run"):
        files = bundle.VersionFiles(candidate["model"], None)
        promotion.register_and_promote(store, files, evaluation, decision, {}, {}, PipelineConfig())
    assert not store.search_registered_models(f"name = '{MODEL}'")


def test_registration_gate_sites_and_loading_leave_no_scratch_folders(store, candidate, tmp_path, scratch_tempdir):
    """Each temporary folder (a gate site's images, a downloaded model, profile or card) is removed when its work is
    done: a machine that retrains and monitors on a schedule must not fill its disk. The loaded predictor needs none
    of them."""
    entries = {
        f"export/{label}/{i}.jpeg": jpeg_bytes(500 + 10 * k + i)
        for k, label in enumerate(("NORMAL", "PNEUMONIA"))
        for i in range(3)
    }
    site = write_zip(tmp_path / "site.zip", entries)
    register(store, candidate)
    result = register(store, candidate, registry=RegistryConfig(model_name=MODEL, gate_sites=[str(site)]))
    assert result.gate["site:site"]["images"] == 6
    predictor, info = load_predictor(MODEL, "champion")
    profile, _ = load_reference_profile(MODEL, "champion")
    update_model_card(store, MODEL, info.version)
    # TensorFlow's autograph writes the sources it generates there too, and removes them when the interpreter exits.
    left = sorted(p.name for p in scratch_tempdir.iterdir() if not p.name.startswith("__autograph_generated_file"))
    assert left == []
    batch = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    expected = candidate["model"].predict(batch, verbose=0).reshape(-1)
    np.testing.assert_allclose(predictor.probabilities(batch), expected, atol=1e-6)
    assert profile.threshold == predictor.profile.threshold == candidate["profile"].threshold


def test_with_required_approval_a_person_moves_the_champion_and_the_card_says_who_and_why(store, candidate):
    from xray.errors import ConfigError

    register(store, candidate)  # v1: the champion, promoted by the gate (no approval asked)
    waiting = RegistryConfig(model_name=MODEL, require_approval=True)
    result = register(store, candidate, registry=waiting)
    assert result.model_version == "2" and not result.promoted and result.pending_approval
    assert "pending approval" in result.reason and "non-inferior to champion v1" in result.reason
    assert str(store.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert str(store.get_model_version_by_alias(MODEL, "candidate").version) == "2"
    tags = store.get_model_version(MODEL, "2").tags
    assert tags["approval"] == "pending" and tags["promotion_decision"] == "pending_approval"

    with pytest.raises(ConfigError, match="needs --reviewer and --reason"):
        decisions.approve(store, waiting, "2", "alice", " ")
    with pytest.raises(ConfigError, match="v1 is not pending approval"):
        decisions.approve(store, waiting, "1", "alice", "looks fine")
    approved = decisions.approve(store, waiting, "2", "Dr. Alice Reviewer", "site b's sensitivity checked on 40 cases")
    assert approved["previous_champion"] == "1"
    assert str(store.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert store.search_model_versions(f"name='{MODEL}'")  # the candidate alias is gone with the approval
    assert "candidate" not in store.get_registered_model(MODEL).aliases
    tags = store.get_model_version(MODEL, "2").tags
    assert tags["approval"] == "approved"
    (history,) = [json.loads(v) for k, v in tags.items() if k.startswith("history.")]
    assert history["by"] == "Dr. Alice Reviewer" and history["action"] == "approved" and history["at"].endswith("Z")
    card = mlflow.artifacts.load_text(f"models:/{MODEL}/2/model_card.md")
    assert "## History" in card and "approved by Dr. Alice Reviewer: site b's sensitivity checked on 40 cases" in card
    assert update_model_card(store, MODEL, "2").count("approved by Dr. Alice Reviewer") == 1  # survives site updates
    with pytest.raises(ConfigError, match="v2 is not pending approval"):
        decisions.approve(store, waiting, "2", "bob", "again")

    # A candidate gated against v2, while the champion moves back to v1: its approval is refused (gate precondition).
    register(store, candidate, registry=waiting)  # v3, gated against v2
    rolled = decisions.rollback(store, waiting, "1", "ops on call", "v2 alarms at site b")
    assert (
        rolled["previous_champion"] == "2" and str(store.get_model_version_by_alias(MODEL, "champion").version) == "1"
    )
    assert "rollback to v1 by ops on call: v2 alarms at site b (champion was v2)" in mlflow.artifacts.load_text(
        f"models:/{MODEL}/1/model_card.md"
    )
    assert "replaced as champion by v1 by ops on call" in mlflow.artifacts.load_text(f"models:/{MODEL}/2/model_card.md")
    with pytest.raises(ConfigError, match="v3 was gated against v2, but the champion is now v1"):
        decisions.approve(store, waiting, "3", "alice", "ok")
    assert str(store.get_model_version_by_alias(MODEL, "champion").version) == "1"
    rejected = decisions.reject(store, waiting, "3", "alice", "gated against a champion we rolled back")
    assert rejected["action"] == "rejected" and store.get_model_version(MODEL, "3").tags["approval"] == "rejected"
    with pytest.raises(ConfigError, match="v3 was never champion"):
        decisions.rollback(store, waiting, "3", "alice", "no")
    with pytest.raises(ConfigError, match="no version 9"):
        decisions.approve(store, waiting, "9", "alice", "no")


def artifact_folder(client, version: str):
    """Where the local store keeps the version's files (its logged model's artifact folder)."""
    from pathlib import Path
    from urllib.parse import urlparse

    from xray.registry.store import logged_model_id

    location = client.get_logged_model(logged_model_id(client.get_model_version(MODEL, version))).artifact_location
    return Path(urlparse(location).path if location.startswith("file:") else location)


def test_a_version_whose_files_changed_after_registration_is_refused_by_every_load(store, candidate, caplog):
    """Registration records the SHA-256 of every file (files.sha256, its digest in the tag model_sha256 and the card);
    loading checks them: one changed byte, one added or removed file, a rewritten file list is one line naming the
    version and the file. The card is not a file of the model (decisions append to it)."""
    from xray.registry import store as registry_store
    from xray.serving.bundle import ModelIntegrityError, manifest

    register(store, candidate)
    version = store.get_model_version(MODEL, "1")
    digest = version.tags["model_sha256"]
    folder = artifact_folder(store, "1")
    listed = (folder / "files.sha256").read_text()
    names = [line.split("  ", 1)[1] for line in listed.splitlines()]
    assert {"MLmodel", "data/model.keras", "data/serving.json", "code/xray/serving/pyfunc.py"} <= set(names)
    assert "model_card.md" not in names and listed == manifest(folder)
    assert f"`{digest}`" in (folder / "model_card.md").read_text() and f"`{digest}`" in version.description
    registry_store.add_history(store, MODEL, "1", {"action": "noted", "by": "a", "why": "b", "at": "2026-12-06T10"})
    registry_store.load_predictor(MODEL, "champion")  # the card changed, the model did not

    weights = folder / "data" / "model.keras"
    original = weights.read_bytes()
    weights.write_bytes(original[:1000] + bytes([original[1000] ^ 1]) + original[1001:])
    with pytest.raises(ModelIntegrityError) as refused:
        registry_store.load_predictor(MODEL, "champion")
    assert str(refused.value).startswith("model version 1 refused: data/model.keras differs from the file registered")
    assert "\n" not in str(refused.value)
    weights.write_bytes(original)
    profile_file = next((folder / "data" / "reference_profile").iterdir())
    saved = profile_file.read_bytes()
    profile_file.write_bytes(saved + b"\0")
    with pytest.raises(ModelIntegrityError, match=f"data/reference_profile/{profile_file.name} differs"):
        registry_store.load_reference_profile(MODEL, "1")
    profile_file.write_bytes(saved)
    (folder / "code" / "xray" / "sitecustomize.py").write_text("print('injected')\n")
    with pytest.raises(ModelIntegrityError, match="code/xray/sitecustomize.py is not one of its files"):
        registry_store.load_predictor(MODEL, "1")
    (folder / "code" / "xray" / "sitecustomize.py").unlink()
    (folder / "files.sha256").write_text(listed.replace(names[0], names[0] + "x"))
    with pytest.raises(ModelIntegrityError, match="does not match the digest recorded"):
        registry_store.resolve_version(MODEL, "1")
    (folder / "files.sha256").write_text(listed)
    registry_store.load_predictor(MODEL, "1")

    # A site's operating point stored later changes what the version answers: the version is sealed again.
    point = {"calibration": {"method": "none"}, "threshold": 0.3, "threshold_policy": "fixed", "fitted_on": "x"}
    registry_store.save_operating_point(store, MODEL, "1", "hospital-b", point)
    resealed = store.get_model_version(MODEL, "1").tags["model_sha256"]
    predictor, _ = registry_store.load_predictor(MODEL, "1")
    assert resealed != digest and "hospital-b" in predictor.operating_points
    assert f"`{resealed}`" in (folder / "model_card.md").read_text()

    # A version registered before digests loads, with one warning per process.
    store.delete_model_version_tag(MODEL, "1", "model_sha256")
    caplog.clear()
    registry_store.load_predictor(MODEL, "1")
    registry_store.load_predictor(MODEL, "1")
    assert [r.getMessage() for r in caplog.records].count(
        "model version 1 has no recorded digest (registered before digests): its files are not verified; register "
        "and approve a new version to have them checked"
    ) == 1


def test_serving_downloads_the_version_checks_it_and_refuses_a_changed_one(store, candidate, tmp_path, capsys):
    from infra import serve

    register(store, candidate)
    local, info = serve.checked_folder(MODEL, "champion", tmp_path / "serving")
    assert info.version == "1" and (tmp_path / "serving" / f"{MODEL}-v1").stat().st_mode & 0o777 == 0o700
    assert os.path.isfile(os.path.join(local, "data", "model.keras"))
    (artifact_folder(store, "1") / "data" / "serving.json").write_text('{"threshold": 0.0}')
    code = serve.main(["--model-name", MODEL, "--folder", str(tmp_path / "serving"), "--port", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: model version 1 refused: data/serving.json differs from the file registered")
    assert not (tmp_path / "serving" / f"{MODEL}-v1").exists()
    # A version registered again and approved by a reviewer is served (its own files, its own digest).
    waiting = RegistryConfig(model_name=MODEL, require_approval=True)
    store.delete_registered_model_alias(MODEL, "champion")  # v1 cannot be scored by the gate any more
    register(store, candidate, registry=waiting)
    decisions.approve(store, waiting, "2", "reviewer", "registered again after v1's files changed")
    local, info = serve.checked_folder(MODEL, "champion", tmp_path / "serving")
    assert (
        info.version == "2" and json.loads(open(os.path.join(local, "data", "serving.json")).read())["version"] == "2"
    )


def test_a_reviewer_applies_a_sites_proposed_operating_point_and_the_version_is_sealed_again(store, candidate):
    """Where the evaluation's account may not change a sealed version (the trainer on the team stack), the re-fitted
    point waits in the site's tag; the reviewer's approval stores it, seals the version again and records it."""
    from xray.errors import ConfigError
    from xray.registry import store as registry_store

    register(store, candidate)
    registry = RegistryConfig(model_name=MODEL)
    with pytest.raises(ConfigError, match="v1 has no proposed operating point for site hospital-b"):
        decisions.apply_operating_point(store, registry, "1", "hospital-b:0", "alice", "checked")
    point = {
        "calibration": {"method": "none"},
        "threshold": 0.25,
        "threshold_policy": "fixed",
        "fitted_on": "20 images",
    }
    measured = {"auc": 0.9, "auc_ci_low": 0.8, "auc_ci_high": 0.95, "threshold": 0.25, "images": 40}
    recalibrated = {"metrics": measured, "fraction": 0.5, "meets_policy": True, "operating_point": point}
    registry_store.record_site_result(store, MODEL, "1", "hospital-b", measured, "run-1", recalibrated)
    before = store.get_model_version(MODEL, "1").tags["model_sha256"]
    with pytest.raises(ConfigError, match=f"is {card.proposal_id(point)}, not 0123456789ab: apply the proposal"):
        decisions.apply_operating_point(store, registry, "1", "hospital-b:0123456789ab", "alice", "checked")
    proposal = f"hospital-b:{card.proposal_id(point)}"
    applied = decisions.apply_operating_point(store, registry, "1", proposal, "alice", "checked on 40 cases")
    assert applied["operating_point"] == point and applied["by"] == "alice"
    predictor, _ = registry_store.load_predictor(MODEL, "1")  # verified against the new digest
    assert predictor.operating_points["hospital-b"]["threshold"] == 0.25
    tags = store.get_model_version(MODEL, "1").tags
    assert tags["model_sha256"] != before
    text = mlflow.artifacts.load_text(f"models:/{MODEL}/1/model_card.md")
    assert "operating point for site hospital-b applied by alice: checked on 40 cases (threshold 0.2500" in text


def test_the_gate_says_when_the_champion_cannot_be_scored(store, candidate, monkeypatch):
    """A champion that cannot be loaded or scored (deleted, its files changed) is in the scores and the decision, and
    the gate rejects: never skipped. Without a champion there is nothing to score: sensitivity alone decides."""
    from xray.registry import store as registry_store

    def unreadable(*args):
        raise OSError("No such file: models:/chest-xray-classifier/3/data/model.keras")

    monkeypatch.setattr(registry_store, "load_predictor", unreadable)
    config = PipelineConfig(registry=RegistryConfig(model_name=MODEL), evaluate=candidate["evaluate"])
    evaluation = Evaluation(candidate["metrics"], candidate["threshold"], [], list(candidate["test_probabilities"]))
    positions = list(range(len(candidate["test_probabilities"])))
    sets = promotion.GateSets("3", {"test": positions})
    scores = promotion.score_candidates(
        candidate["model"], candidate["dataset"], candidate["spec"], sets, None, evaluation, config
    )
    assert scores.champion_error.startswith("OSError: No such file") and scores.champion_probabilities == {}
    decision = gate.decide_on(scores, 0.97, 0.95, 0.01, 100, 0)
    assert not decision.promoted and "champion v3 could not be scored" in decision.reason
    assert gate.decide_on(gate.Scores(None), 0.97, 0.95, 0.01, 100, 0).promoted


def test_nothing_is_signed_off_or_sealed_over_files_or_a_card_changed_behind_the_registrys_back(store, candidate):
    """A reviewer's approval signs off the exact files registered: a version without the digest its card recorded is
    refused; sealing again (a site's operating point) starts from the files as sealed, so a changed weight file is
    refused, never digested; a card changed in the artifact store is refused, never published."""
    from xray.errors import ConfigError
    from xray.registry import store as registry_store
    from xray.serving.bundle import ModelIntegrityError

    register(store, candidate)
    waiting = RegistryConfig(model_name=MODEL, require_approval=True)
    register(store, candidate, registry=waiting)  # v2, pending
    store.set_model_version_tag(MODEL, "2", "model_sha256", "0" * 64)  # no server rule here: as S3 or a hole would
    with pytest.raises(ConfigError, match="v2 has no digest recorded at registration"):
        decisions.approve(store, waiting, "2", "alice", "looks fine")
    assert str(store.get_model_version_by_alias(MODEL, "champion").version) == "1"

    folder = artifact_folder(store, "1")
    weights = folder / "data" / "model.keras"
    original = weights.read_bytes()
    weights.write_bytes(original + b"\0")
    point = {"calibration": {"method": "none"}, "threshold": 0.3, "threshold_policy": "fixed", "fitted_on": "x"}
    with pytest.raises(ModelIntegrityError, match="data/model.keras"):
        registry_store.save_operating_point(store, MODEL, "1", "b", point)
    weights.write_bytes(original)
    (artifact_folder(store, "2") / "model_card.md").write_text("# a card nobody wrote\n")
    with pytest.raises(ModelIntegrityError, match="model version 2 refused: its model card differs"):
        decisions.reject(store, waiting, "2", "alice", "no")
    version = store.get_model_version(MODEL, "2")  # refused before anything moved
    assert "a card nobody wrote" not in version.description and version.tags["approval"] == "pending"


def test_a_file_list_holds_one_file_per_line_and_each_once(tmp_path):
    from xray.serving import bundle

    (tmp_path / "a").write_bytes(b"A")
    listing = bundle.manifest(tmp_path)
    (tmp_path / "zz\u2028sneaky").write_bytes(b"A")
    with pytest.raises(bundle.ModelIntegrityError, match="a name no file list can hold"):
        bundle.manifest(tmp_path)
    (tmp_path / "zz\u2028sneaky").unlink()
    doubled = listing + listing
    with pytest.raises(bundle.ModelIntegrityError, match="lists a twice"):
        bundle.verify(tmp_path, doubled, bundle.digest(doubled), "1")
    hidden = listing.rstrip("\n") + "\u2028" + listing
    with pytest.raises(bundle.ModelIntegrityError, match="a line that is not one file's"):
        bundle.verify(tmp_path, hidden, bundle.digest(hidden), "1")
    bundle.verify(tmp_path, listing, bundle.digest(listing), "1")


def register_under_plan(client, candidate, config: PipelineConfig, approved=frozenset()) -> promotion.Registration:
    """The training pipeline's registration steps with a change plan: the candidate classified against the
    champion's record (decide_promotion's branch), then registered."""
    from xray.registry.control import plan

    evaluation = Evaluation(
        candidate["metrics"], candidate["threshold"], [], [float(p) for p in candidate["test_probabilities"]]
    )
    spec = candidate["spec"]
    training = {"backbone": "tiny", "weights": "none", "epochs_run": 1, "image_size": spec.image_size}
    training |= {"preprocessing": spec.preprocessing, "class_weights": spec.class_weights, "counts": spec.counts}
    with tempfile.TemporaryDirectory() as workdir:
        sets, images = promotion.load_gate_sets(client, candidate["dataset"], spec, config, Path(workdir))
        scores = promotion.score_candidates(
            candidate["model"], candidate["dataset"], spec, sets, images, evaluation, config
        )
    lineage = promotion.training_data(candidate["data_report"])
    record = plan.version_record(config, "c0de" * 16, lineage, spec.preprocessing)
    measured = (evaluation.flat["test_sensitivity"], evaluation.report, set(approved), 100)
    decision = plan.judge(config, scores, sets.champion_record, record, measured)
    with mlflow.start_run():
        return promotion.register_and_promote(
            client,
            bundle.VersionFiles(candidate["model"], candidate["profile"]),
            evaluation,
            decision,
            training | {"dataset_sha256": "ab" * 32},
            candidate["data_report"],
            config,
        )


def test_under_a_change_plan_the_run_holds_the_impact_report_the_card_links_it_and_a_new_plan_waits(store, candidate):
    from xray.config.change_plan import ChangePlanConfig
    from xray.errors import ConfigError
    from xray.registry.control import impact, plan

    first_plan = ChangePlanConfig(criteria={"min_sensitivity": 0.5, "margin": 0.2, "site_margin": 0.2, "max_ece": 1})
    config = PipelineConfig(
        registry=RegistryConfig(model_name=MODEL), evaluate=candidate["evaluate"], seed=0, change_plan=first_plan
    )
    first = register_under_plan(store, candidate, config)
    assert first.promoted and first.impact_report["plan_version"] == 1
    tags = store.get_model_version(MODEL, "1").tags
    assert json.loads(tags[plan.RECORD_TAG])["plan_digest"] == plan.plan_digest(first_plan)
    run = store.get_run(first.mlflow_run_id)
    link = f"runs:/{first.mlflow_run_id}/impact/{impact.MARKDOWN_FILE}"
    assert run.data.tags["impact_report"] == link
    logged = json.loads(mlflow.artifacts.load_text(f"runs:/{first.mlflow_run_id}/impact/{impact.JSON_FILE}"))
    assert logged == json.loads(json.dumps(first.impact_report)) and logged["decision"] == "promoted"
    assert "# Impact report: registration-test v1" in mlflow.artifacts.load_text(link)
    card = mlflow.artifacts.load_text(f"models:/{MODEL}/1/model_card.md")
    assert "### Change control" in card and f"`{link}`" in card

    # A larger input: outside the plan, refused naming the change; registered, never champion.
    bigger = config.model_copy(update={"model": config.model.model_copy(update={"image_size": 256})})
    refused = register_under_plan(store, candidate, bigger)
    assert not refused.promoted and refused.reason.startswith("outside the change plan v1: model.image_size 128 -> 256")
    assert store.get_model_version(MODEL, refused.model_version).tags["promotion_decision"] == "rejected"
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{refused.mlflow_run_id}/impact/{impact.JSON_FILE}"))
    assert report["in_plan"] is False and report["changes"][0]["what"] == "model.image_size"

    # A new plan version: the version that passes under it waits; approve refuses it until the plan is approved.
    second_plan = first_plan.model_copy(update={"version": 2})
    widened = config.model_copy(update={"change_plan": second_plan})
    waiting = register_under_plan(store, candidate, widened)
    assert waiting.pending_approval and not waiting.promoted and "audit approve-plan" in waiting.reason
    assert str(store.get_model_version_by_alias(MODEL, "candidate").version) == waiting.model_version
    with pytest.raises(ConfigError, match="gated under change plan v2 .* no reviewer has approved"):
        decisions.approve(store, config.registry, waiting.model_version, "Dr. R", "fine")
    approved = decisions.approve(
        store, config.registry, waiting.model_version, "Dr. R", "fine", approved_plans={plan.plan_digest(second_plan)}
    )
    assert approved["previous_champion"] == "1"
