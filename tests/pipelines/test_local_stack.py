"""The default local stack (xray-local) end to end, on one shared run (conftest.local: the smoke config on
chest_xray_mini.zip, read from an s3:// URI with sentinel credentials): its summary, MLflow records and secrets;
the variations that need a pipeline around them (caching, the gate against a champion, one failure of each class);
two sources with their lineage, approval and rollback. What the champion then does (inference, DICOM, the PACS, the
node, monitoring, feedback) is tests/pipelines/test_local_stack_serving.py's, on a second worker.

Isolated stores: a temporary ZENML_CONFIG_PATH and a temporary SQLite MLflow. The tests run in file order, on one
worker under `make test` (--dist loadfile), and later ones see the versions earlier ones registered.
"""

import json
import re
import zipfile

import pytest
import yaml

from stacks import (
    LOCAL_SOURCE,
    SENTINEL_ACCESS_KEY,
    SENTINEL_SECRET,
    mlflow_client,
    run_cli,
    summary_of,
)
from steps import __all__ as training_steps
from support import FULL_ZIP, MINI_ZIP, ROOT, dataset_entries, isolated_env, require, run_command

pytestmark = pytest.mark.slow
STEPS = list(training_steps)  # the training pipeline's steps, in order


@pytest.fixture(scope="module")
def first_run(local):
    summary = local.summary
    assert json.loads((local.home / "summary.json").read_text()) == summary
    return summary, local.result


def test_summary(first_run):
    summary, result = first_run
    # stdout is the summary line alone; progress and third-party output go to stderr, without the noise.
    assert len(result.stdout.splitlines()) == 1 and json.loads(result.stdout) == summary
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", result.stderr)  # ZenML's console handler colours parts of lines
    assert 'HTTP/1.1" 200' not in stderr and "Found credentials" not in stderr
    # TensorFlow's import banner, Keras' own epoch lines and MLflow's table creation are off at the default level;
    # the project's own epoch line stays.
    for noise in (
        "oneDNN",
        "absl::InitializeLog",
        "Epoch 1/1",
        "/step - ",
        "Creating initial MLflow database tables",
        "Failed to disable MLflow autologging",
        "shuffle=True",
    ):
        assert noise not in stderr, noise
    assert re.search(r"^.*epoch 1/1: loss=\S+ auc=\S+ val_loss=\S+ val_auc=", stderr, re.M)
    assert summary["steps"] == {name: "completed" for name in STEPS}
    assert summary["promoted"] is True and summary["model_version"] == "1"
    assert summary["splits"]["test"] == {"NORMAL": 23, "PNEUMONIA": 24}
    train_val = sum(summary["splits"][s][c] for s in ("train", "val") for c in ("NORMAL", "PNEUMONIA"))
    assert train_val + summary["splits"]["duplicates_removed"] + summary["splits"]["quarantined"] == 194
    assert len(summary["dataset_sha256"]) == 64
    assert {"test_auc", "test_accuracy", "test_sensitivity", "test_specificity", "val_auc"} <= summary["metrics"].keys()
    assert 0 < summary["threshold"] < 1


def test_mlflow_has_params_curves_metrics_and_plots(first_run, stores):
    summary, _ = first_run
    client = mlflow_client(stores[1])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.experiment_id == client.get_experiment_by_name("chest-xray-training").experiment_id
    params = run.data.params
    assert params["train.batch_size"] == "16" and params["model.image_size"] == "64"
    assert params["dataset.sha256"] == summary["dataset_sha256"]
    assert params["dataset.source_uri"] == LOCAL_SOURCE
    assert run.data.metrics["test_auc"] == pytest.approx(summary["metrics"]["test_auc"])
    assert len(client.get_metric_history(run.info.run_id, "epoch_val_auc")) == 1
    artifacts = {a.path for folder in ("plots", "data") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {
        "plots/roc_pr_curves.png",
        "plots/confusion_matrix.png",
        "plots/calibration.png",
        "plots/training_curves.png",
        "data/class_distribution.png",
        "data/sample_grid.png",
    } <= artifacts
    version = client.get_model_version("chest-xray-classifier", "1")
    assert version.tags["promotion_decision"] == "promoted"
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == "1"
    # Change control (#45): the smoke config's plan; the first version's impact report in its run, linked from its
    # card; the trail holds the plan version, the gate's decision and the registration, and verifies.
    link = run.data.tags["impact_report"]
    assert link == f"runs:/{run.info.run_id}/impact/impact_report.md"
    assert {"impact/impact_report.md", "impact/impact_report.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "impact")
    }
    import mlflow

    mlflow.set_tracking_uri(stores[1]["MLFLOW_TRACKING_URI"])
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/impact/impact_report.json"))
    assert report["model_version"] == "1" and report["plan_version"] == 1 and report["decision"] == "promoted"
    assert "# Impact report: chest-xray-classifier v1" in mlflow.artifacts.load_text(link)
    card = mlflow.artifacts.load_text("models:/chest-xray-classifier/1/model_card.md")
    assert "### Change control" in card and f"`{link}`" in card
    assert json.loads(version.tags["change_control"])["plan_version"] == 1

    def audit(*args):
        return run_command([ROOT / "run.py", "audit", *args, "--config", stores[1]["XRAY_TEST_CONFIG"]], stores[1], 300)

    verified = audit("verify")
    assert verified.returncode == 0 and json.loads(verified.stdout)["intact"], verified.stderr[-2000:]
    shown = json.loads(audit("show", "--json").stdout)
    assert [r["what"] for r in shown["records"]] == ["plan version", "gate decision", "registration"]
    assert shown["records"][2]["details"]["model_version"] == "1" and len(shown["files"]) == 3
    assert all("/audit/record-" in path for path in shown["files"])


def test_the_sentinel_secret_appears_nowhere(first_run, stores):
    """Credentials never reach configs, logs, MLflow, ZenML metadata or the summary: every output stream and every
    file of both stores (SQLite databases and artifacts included) is searched for them."""
    summary, result = first_run
    home, _ = stores
    for stream in (result.stdout, result.stderr):
        assert SENTINEL_SECRET not in stream and SENTINEL_ACCESS_KEY not in stream
    searched = 0
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            searched += 1
            assert SENTINEL_SECRET.encode() not in data, f"secret found in {path}"
            assert SENTINEL_ACCESS_KEY.encode() not in data, f"access key id found in {path}"
    assert searched > 10  # both stores, databases and artifacts, were really searched
    assert any(p.suffix == ".db" for p in home.rglob("*")) and summary["model_version"] == "1"


def _verify(env, home, *args):
    """scripts/verify_registered.py on the local run's summary."""
    return run_command([ROOT / "scripts" / "verify_registered.py", "--summary", home / "summary.json", *args], env, 600)


def test_champion_reload_reproduces_test_auc(first_run, stores):
    """scripts/verify_registered.py: a reload through the registry, test images decoded straight from the zip."""
    summary, _ = first_run
    home, env = stores
    report_path = home / "verify.json"
    result = _verify(env, home, "--version", "champion", "--archive", str(MINI_ZIP), "--output", str(report_path))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads(report_path.read_text())
    assert report["n"] == 47 and report["version"] == summary["model_version"]
    assert report["threshold"] == pytest.approx(summary["threshold"])
    assert report["auc"] == pytest.approx(summary["metrics"]["test_auc"], abs=0.005)
    assert report["ci95_at_0_5"]["accuracy"][0] <= report["at_0_5"]["accuracy"] <= report["ci95_at_0_5"]["accuracy"][1]


def test_verify_refuses_a_different_archive(first_run, stores, tmp_path):
    home, env = stores
    other = tmp_path / "other.zip"
    _zip(other, dataset_entries())
    result = _verify(env, home, "--archive", str(other))
    assert result.returncode == 1 and "is not the archive this version was trained on" in result.stderr


def test_identical_rerun_is_cached_by_content(first_run, stores):
    _, env = stores
    summary = summary_of(run_cli(env))
    # always look at the objects again
    assert summary["steps"]["locate_archive"] == summary["steps"]["locate_sources"] == "completed"
    # The same object: its archive is not downloaded or stored again, and nothing downstream reruns.
    assert all(summary["steps"][name] == "cached" for name in STEPS if not name.startswith("locate_")), summary["steps"]
    assert summary["model_version"] == first_run[0]["model_version"]


def _zip(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        return path


# End to end: an unsafe archive is refused in one line, with nothing registered and the MLflow run FAILED. Every other
# archive case (absolute path, symlink, zip bomb, duplicate entry names, total and count limits, not a zip, empty,
# truncated, layout, unknown or empty class, too many images that do not decode) fails in the same step through the
# same error types: tests/xray/storage/test_archive.py, test_manifest.py and test_dataset.py; S3 failures (missing bucket or
# object, denied, unreachable, throttled) raise the same one-line error type in ingest: test_s3.py, test_s3_retry.py.
def test_an_unsafe_archive_fails_in_one_line_and_registers_nothing(first_run, stores, tmp_path):
    _, env = stores
    message = "unsafe archive: path traversal in entry 'chest_xray/../../escape.jpeg'"
    bad = _zip(tmp_path / "traversal.zip", dataset_entries() | {"chest_xray/../../escape.jpeg": b"x"})
    before = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    result = run_cli(env, "--dataset-uri", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    after = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    assert [v.version for v in after] == [v.version for v in before]
    champion = mlflow_client(env).get_model_version_by_alias("chest-xray-classifier", "champion")
    assert str(champion.version) == "1"
    # The failed pipeline's MLflow run (opened by the ingest step) ends FAILED, with the step and the error as tags.
    client = mlflow_client(env)
    experiment = client.get_experiment_by_name("chest-xray-training")
    latest = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    assert latest.info.status == "FAILED" and latest.data.tags["failed_step"] == "unzip_and_validate"
    assert message in latest.data.tags["error"]


def _variant(env, path, **section_changes):
    """The module's config with some sections changed, as the environment of a run."""
    raw = yaml.safe_load(open(env["XRAY_TEST_CONFIG"]))
    for section, changes in section_changes.items():
        raw[section] = raw.get(section, {}) | changes
    path.write_text(yaml.safe_dump(raw))
    return {**env, "XRAY_TEST_CONFIG": str(path)}


def test_failed_training_leaves_the_registry_untouched(first_run, stores, tmp_path):
    env = _variant(stores[1], tmp_path / "variant.yaml", model={"weights": str(tmp_path / "missing.weights.h5")})
    before = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    result = run_cli(env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: model.weights: weights file not found: {tmp_path / 'missing.weights.h5'}"
    )
    after = mlflow_client(env).search_model_versions("name='chest-xray-classifier'")
    assert sorted(v.version for v in after) == sorted(v.version for v in before)


def _labelled_site(folder, prefix="chest_xray/test/"):
    """A site folder from the mini archive's test split, its class folders two levels down and lower-cased."""
    with zipfile.ZipFile(MINI_ZIP) as archive:
        for name in archive.namelist():
            if name.startswith(prefix) and name.endswith(".jpeg"):
                label, file = name.split("/")[-2:]
                target = folder / "hospital" / "2026" / label.lower() / file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    return folder


def test_a_challenger_is_gated_on_paired_scores_against_the_champion(first_run, stores, tmp_path):
    site = _labelled_site(tmp_path / "site-b")
    env = _variant(stores[1], tmp_path / "gated.yaml", registry={"gate_sites": [str(site)], "margin": 0.01})
    client = mlflow_client(env)
    champion = str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version)
    summary = summary_of(run_cli(env))
    # Only registration settings changed: the trained model and its evaluation come from the cache, and the
    # challenger (the same weights, registered again) is compared with the champion on paired scores.
    assert summary["steps"]["train_model"] == "cached" and summary["steps"]["register_and_promote"] == "completed"
    version = client.get_model_version("chest-xray-classifier", summary["model_version"])
    tags = version.tags
    assert tags["gate.champion_version"] == str(champion) and tags["gate.margin"] == "0.01"
    for image_set, images in (("test", 47), ("site:site-b", 47)):
        assert tags[f"gate.{image_set}.images"] == str(images)
        low, high = (
            float(tags[f"gate.{image_set}.auc_difference_ci_low"]),
            float(tags[f"gate.{image_set}.auc_difference_ci_high"]),
        )
        assert low <= float(tags[f"gate.{image_set}.auc_difference"]) <= high
    non_inferior = all(float(tags[f"gate.{s}.auc_difference_ci_low"]) >= -0.01 for s in ("test", "site:site-b"))
    assert summary["promoted"] is non_inferior and tags["promotion_decision"] == (
        "promoted" if non_inferior else "rejected"
    )
    assert f"champion v{champion}" in tags["promotion_reason"]
    now = str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version)
    assert now == (summary["model_version"] if non_inferior else champion)
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    card = open(
        mlflow.artifacts.download_artifacts(
            f"models:/chest-xray-classifier/{version.version}/model_card.md", dst_path=str(tmp_path / "card")
        )
    ).read()
    assert "## Promotion gate" in card and "| site:site-b | 47 |" in card and "## Results by site" in card


def _second_site(folder, per_class=90):
    """A labelled folder of training images of the full archive that the mini archive does not hold (so none is a
    duplicate of the base source), NORMAL/ and PNEUMONIA/ two levels down."""
    with zipfile.ZipFile(MINI_ZIP) as mini:
        held = {name.rsplit("/", 1)[-1] for name in mini.namelist()}
    with zipfile.ZipFile(require(FULL_ZIP)) as archive:
        for label in ("NORMAL", "PNEUMONIA"):
            names = sorted(
                n
                for n in archive.namelist()
                if f"/train/{label}/" in n and n.endswith(".jpeg") and n.rsplit("/", 1)[-1] not in held
            )[-per_class:]
            for name in names:
                target = folder / "export" / label / name.rsplit("/", 1)[-1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    return folder


@pytest.fixture(scope="module")
def two_sources(stores, tmp_path_factory):
    """The module's config with a second labelled source (site b), as (site folder, environment). A wide margin and a
    low floor: the smoke model is near chance, and what is under test (lineage, the skip, approval) needs the
    two-source version to become champion."""
    home = tmp_path_factory.mktemp("two-sources")
    site = _second_site(home / "site-b")
    plan = yaml.safe_load(open(stores[1]["XRAY_TEST_CONFIG"]))["change_plan"]
    # Change plan v2: site b listed, the lower floor within the operating point's bounds, the wide margins; a new
    # plan version governs once the reviewer approved it (no accounts on this stack: --reviewer names who).
    plan |= {"version": 2, "sites": ["guangzhou", "b"]}
    plan["operating_point"]["evaluate.min_sensitivity"] = {"low": 0.5, "high": 0.99}
    plan["criteria"] |= {"min_sensitivity": 0.5, "margin": 0.49, "site_margin": 0.49, "subgroup_margin": 0.49}
    env = _variant(
        stores[1],
        home / "two-sources.yaml",
        data={"sources": [{"site": "guangzhou"}, {"site": "b", "uri": str(site)}], "max_eval_per_class": 40},
        registry={"margin": 0.49},
        evaluate={"min_sensitivity": 0.5, "min_recalibration_per_class": 8},
        change_plan=plan,
    )
    approval = [
        "audit",
        "approve-plan",
        "--reviewer",
        "Dr. R",
        "--reason",
        "site b",
        "--config",
        env["XRAY_TEST_CONFIG"],
    ]
    summary_of(run_command([ROOT / "run.py", *approval], env, 300))
    return site, env


def test_two_sources_train_together_with_lineage_and_an_unchanged_retraining_is_skipped(
    first_run, two_sources, tmp_path, monkeypatch, caplog
):
    import shutil
    import time

    site, env = two_sources
    started = time.perf_counter()
    summary = summary_of(run_cli(env))
    trained_s = time.perf_counter() - started
    assert summary["promoted"], summary["promotion_reason"]
    sites = summary["sites"]
    assert set(sites) == {"guangzhou", "b"} and sites["b"]["source"] == str(site)
    assert sum(sum(c.values()) for c in sites["b"]["splits"].values()) == 180
    assert all(sum(sites["b"]["splits"][split].values()) > 0 for split in ("train", "val", "test"))
    for name in ("guangzhou", "b"):
        metrics = sites[name]["metrics"]
        assert metrics["auc_ci_low"] <= metrics["auc"] <= metrics["auc_ci_high"] and metrics["images"] > 0
    client = mlflow_client(env)
    run = client.get_run(summary["mlflow_run_id"])
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"guangzhou", "b"}
    assert {t.key: t.value for t in inputs["b"].tags}["mlflow.data.context"] == "training"
    assert json.loads({t.key: t.value for t in inputs["b"].tags}["counts"]) == sites["b"]["splits"]
    version = client.get_model_version("chest-xray-classifier", summary["model_version"])
    assert "gate.test:b.images" in version.tags and "gate.test:guangzhou.images" in version.tags
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    card = open(
        mlflow.artifacts.download_artifacts(
            f"models:/chest-xray-classifier/{version.version}/model_card.md", dst_path=str(tmp_path / "card")
        )
    ).read()
    assert "## Training sources" in card and f"| b | `{site}` |" in card and "## Results per site" in card

    versions = len(client.search_model_versions("name='chest-xray-classifier'"))
    started = time.perf_counter()
    skipped = summary_of(run_cli(env, "--if-changed"))
    skipped_s = time.perf_counter() - started
    assert skipped["skipped"] == f"no new data since version {summary['model_version']}"
    assert len(client.search_model_versions("name='chest-xray-classifier'")) == versions
    assert (
        str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == summary["model_version"]
    )
    # Skipped before any step ran: no pipeline run, no new version (the time is printed, never asserted).
    assert "pipeline_run_id" not in skipped
    print(f"two-source smoke training {trained_s:.1f} s; --if-changed with no new data {skipped_s:.1f} s")

    # One new image at site b: the check says so and trains (called in this process, to spare a third training).
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, env[key])
    from pipelines.training import unchanged_since
    from xray.config_file import load_config

    config = load_config(env["XRAY_TEST_CONFIG"])
    config = config.model_copy(
        update={"registry": config.registry.model_copy(update={"tracking_uri": env["MLFLOW_TRACKING_URI"]})}
    )
    assert unchanged_since(config, None)["model_version"] == summary["model_version"]
    # The same images elsewhere are the same data (the digest is of content); one image more is not. A copy, so
    # that the site stays as the champion saw it for the next test.
    grown = shutil.copytree(site, tmp_path / "site-b-grown")
    with zipfile.ZipFile(MINI_ZIP) as mini:
        image = mini.read(next(n for n in mini.namelist() if n.endswith(".jpeg")))
    moved = config.data.model_copy(
        update={"sources": (config.data.sources[0], config.data.sources[1].model_copy(update={"uri": str(grown)}))}
    )
    assert unchanged_since(config.model_copy(update={"data": moved}), None) is not None
    (grown / "export" / "NORMAL" / "new-study.jpeg").write_bytes(image)
    with caplog.at_level("INFO", logger="pipelines.launch"):
        assert unchanged_since(config.model_copy(update={"data": moved}), None) is None
    assert "changed: b" in caplog.text


def test_a_required_approval_waits_for_a_person_and_a_rollback_restores_the_champion(two_sources, tmp_path):
    # The champion's own config (the two-source run above) with approval required: the same model from the cache,
    # so the gate's paired difference is exactly zero and the version waits for a person.
    env = _variant(two_sources[1], tmp_path / "approval.yaml", registry={"require_approval": True})
    client = mlflow_client(env)
    champion = str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version)
    summary = summary_of(run_cli(env))  # only registration settings changed: training comes from the cache
    version = summary["model_version"]
    assert summary["steps"]["train_model"] == "cached" and not summary["promoted"], summary
    assert "pending approval" in summary["promotion_reason"]
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == champion
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "candidate").version) == version

    def decide(*args):
        return run_command([ROOT / "run.py", "--config", env["XRAY_TEST_CONFIG"], *args], env, 300)

    approved = summary_of(decide("approve", "--model-version", version, "--reviewer", "Dr. Q", "--reason", "read 40"))
    assert approved["previous_champion"] == champion and approved["zenml_stage"] == "production"
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == version
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    card = mlflow.artifacts.load_text(f"models:/chest-xray-classifier/{version}/model_card.md")
    assert f"approved by Dr. Q: read 40 (champion was v{champion})" in card
    again = decide("approve", "--model-version", version, "--reviewer", "Dr. Q", "--reason", "again")
    assert (
        again.returncode == 2 and f"error: v{version} is not pending approval" in again.stderr.strip().splitlines()[-1]
    )
    rolled = summary_of(decide("rollback", "--to", champion, "--reviewer", "on-call", "--reason", "alarms"))
    assert rolled["previous_champion"] == version and rolled["zenml_stage"] == "production"
    assert str(client.get_model_version_by_alias("chest-xray-classifier", "champion").version) == champion
    assert "replaced as champion by v" + champion in mlflow.artifacts.load_text(
        f"models:/chest-xray-classifier/{version}/model_card.md"
    )


def test_bad_config_is_rejected_before_any_step(tmp_path):
    env = isolated_env(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  batch_size: -4\n")
    result = run_command([ROOT / "run.py", "--config", config], env, 300)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: invalid config {config}: train.batch_size: Input should be greater than or equal to 1"
    )
