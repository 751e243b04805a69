"""The SageMaker run config, the stack recipe and the cloud requirements, checked without AWS."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steps import __all__ as training_steps
from support import ROOT
from xray.config.pipeline import PipelineConfig
from xray.config_file import load_config

CONFIG = ROOT / "configs" / "training_sagemaker.yaml"
SCRIPT = ROOT / "scripts" / "register_sagemaker_stack.sh"
STEPS = list(training_steps)


@pytest.fixture(scope="module")
def run_configuration():
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    config = load_config(CONFIG)
    return config, PipelineRunConfiguration.model_validate(config.zenml)


def test_pipeline_parameters_validate_against_the_config_model(run_configuration):
    config, _ = run_configuration
    assert isinstance(config, PipelineConfig)
    assert (config.model.weights, config.model.image_size, config.train.batch_size) == ("imagenet", 224, 128)
    assert (config.train.mixed_precision, config.train.jit_compile) == ("on", "on")
    assert config.s3.embedded is False


def test_only_train_model_runs_on_the_step_operator(run_configuration):
    _, zenml_config = run_configuration
    bound = {name for name, step in zenml_config.steps.items() if step.step_operator}
    assert bound == {"train_model"}
    assert zenml_config.steps["train_model"].step_operator == "sagemaker"
    assert set(zenml_config.steps) <= set(STEPS)


def test_gpu_instance_and_cpu_orchestrator_settings_resolve(run_configuration):
    from zenml.integrations.aws.flavors.sagemaker_orchestrator_flavor import SagemakerOrchestratorSettings
    from zenml.integrations.aws.flavors.sagemaker_step_operator_flavor import SagemakerStepOperatorSettings

    _, zenml_config = run_configuration
    step = SagemakerStepOperatorSettings.model_validate(
        zenml_config.steps["train_model"].settings["step_operator.sagemaker"].model_dump()
    )
    assert step.estimator_args["instance_type"] == "ml.g5.xlarge"
    orchestrator = SagemakerOrchestratorSettings.model_validate(
        zenml_config.settings["orchestrator.sagemaker"].model_dump()
    )
    assert orchestrator.instance_type.startswith("ml.m5")  # the other steps run on CPU


def test_docker_settings_install_project_requirements_not_the_tf_integration(run_configuration):
    from zenml.config import DockerSettings

    _, zenml_config = run_configuration
    docker = DockerSettings.model_validate(zenml_config.settings["docker"].model_dump())
    assert docker.parent_image.startswith("tensorflow/tensorflow:2.21") and docker.parent_image.endswith("-gpu")
    assert (ROOT / docker.requirements).is_file()
    assert docker.install_stack_requirements is False
    assert "tensorflow" not in (docker.required_integrations or [])


def _names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=!\[; ]", line, maxsplit=1)[0].lower())
    return names


def test_sagemaker_image_requirements_follow_the_local_and_aws_sets():
    image = _names(ROOT / "requirements-sagemaker.txt")
    local = _names(ROOT / "requirements.txt") - {"tensorflow-cpu", "moto"}  # TF comes from the GPU parent image
    assert image == local | _names(ROOT / "requirements-aws.txt")


def _script(env, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("XRAY_", "MLFLOW_", "AWS_"))}
    return subprocess.run(["bash", str(SCRIPT), *args], env=clean | env, capture_output=True, text=True, timeout=60)


STACK_ENV = {
    "AWS_REGION": "eu-west-1",
    "XRAY_ARTIFACT_BUCKET": "xray-artifacts",
    "XRAY_SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/xray-sagemaker",
    "XRAY_ECR_REGISTRY": "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
    "XRAY_CODEBUILD_PROJECT": "xray-build",
    "MLFLOW_TRACKING_URI": "arn:aws:sagemaker:eu-west-1:123456789012:mlflow-tracking-server/xray",
}


def test_stack_recipe_dry_run_shows_the_zenml_commands():
    result = _script(STACK_ENV, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in (
        "zenml artifact-store register xray-sagemaker-s3 --flavor=s3 --path=s3://xray-artifacts/zenml",
        "--flavor=sagemaker --execution_role=arn:aws:iam::123456789012:role/xray-sagemaker --region=eu-west-1",
        "zenml step-operator register sagemaker --flavor=sagemaker",
        "zenml container-registry register xray-sagemaker-ecr --flavor=aws",
        "zenml image-builder register xray-sagemaker-codebuild --flavor=aws --code_build_project=xray-build",
        "zenml experiment-tracker register xray-sagemaker-mlflow --flavor=mlflow --tracking_uri=arn:aws:sagemaker",
        "zenml model-registry register xray-sagemaker-mlflow-registry --flavor=mlflow",
        "zenml stack register xray-sagemaker",
    ):
        assert expected in out
    assert "dry run: nothing was registered" in out


def test_stack_recipe_rejects_missing_or_malformed_inputs_and_hides_tokens():
    missing = _script({"AWS_REGION": "eu-west-1"}, "--dry-run")
    assert missing.returncode == 2 and "missing environment variables: XRAY_ARTIFACT_BUCKET" in missing.stderr
    bad_role = _script(STACK_ENV | {"XRAY_SAGEMAKER_ROLE_ARN": "admin"}, "--dry-run")
    assert bad_role.returncode == 2 and "not an IAM role ARN" in bad_role.stderr
    http = STACK_ENV | {"MLFLOW_TRACKING_URI": "https://mlflow.example.org"}
    assert "set MLFLOW_TRACKING_TOKEN" in _script(http, "--dry-run").stderr
    with_token = _script(http | {"MLFLOW_TRACKING_TOKEN": "tok-SENTINEL"}, "--dry-run")
    assert with_token.returncode == 0 and "tok-SENTINEL" not in with_token.stdout + with_token.stderr
    assert "--tracking_token={{xray-sagemaker-mlflow.token}}" in with_token.stdout


@pytest.mark.slow
def test_local_path_does_not_import_sagemaker(tmp_path):
    # A script file, not -c: ZenML needs a main module file to find its source root.
    script = tmp_path / "imports.py"
    script.write_text(
        "import sys; import run, pipelines, pipelines.launch, steps, materializers\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'sagemaker'); print(bad)\n"
        "sys.exit(bool(bad))\n"
    )
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_combined_requirements_resolve(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(tmp_path / "report.json"),
            "-r",
            "requirements.txt",
            "-r",
            "requirements-aws.txt",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = yaml.safe_load((tmp_path / "report.json").read_text())
    to_install = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
    assert to_install["sagemaker"].startswith("2.")
    # The local stack's pins stay as they are: nothing of the core set is up- or downgraded.
    assert not {"tensorflow-cpu", "keras", "mlflow", "zenml"} & to_install.keys(), to_install


def test_the_sagemaker_train_step_gets_a_checkpoint_s3_uri_under_the_artifact_store():
    from pipelines import launch
    from xray.errors import ConfigError

    config = load_config(CONFIG)
    resolved = launch.with_sagemaker_checkpoints(config.zenml, config.train.backup_dir, "s3://xray-artifacts/zenml/")
    estimator = resolved["steps"]["train_model"]["settings"]["step_operator.sagemaker"]["estimator_args"]
    assert estimator["checkpoint_s3_uri"] == "s3://xray-artifacts/zenml/checkpoints/train_model"
    assert estimator["checkpoint_local_path"] == config.train.backup_dir == "/opt/ml/checkpoints"
    assert (
        "checkpoint_s3_uri"
        not in config.zenml["steps"]["train_model"]["settings"]["step_operator.sagemaker"]["estimator_args"]
    )  # the loaded config itself is left alone
    # A user's own URI is kept; no backup_dir, no checkpoints; a non-S3 artifact store cannot hold them.
    own = yaml.safe_load(yaml.safe_dump(config.zenml))
    own["steps"]["train_model"]["settings"]["step_operator.sagemaker"]["estimator_args"]["checkpoint_s3_uri"] = (
        "s3://x/y"
    )
    kept = launch.with_sagemaker_checkpoints(own, "/opt/ml/checkpoints", "s3://xray-artifacts/zenml")
    assert (
        kept["steps"]["train_model"]["settings"]["step_operator.sagemaker"]["estimator_args"]["checkpoint_s3_uri"]
        == "s3://x/y"
    )
    none = launch.with_sagemaker_checkpoints(config.zenml, None, "s3://xray-artifacts/zenml")
    assert (
        "checkpoint_s3_uri" not in none["steps"]["train_model"]["settings"]["step_operator.sagemaker"]["estimator_args"]
    )
    with pytest.raises(ConfigError, match="not on S3"):
        launch.with_sagemaker_checkpoints(config.zenml, "/opt/ml/checkpoints", "/home/me/.config/zenml/local_stores/x")


def _installed(versions):
    from importlib.metadata import PackageNotFoundError

    def lookup(name):
        if name not in versions:
            raise PackageNotFoundError(name)
        return versions[name]

    return lookup


RUNTIME = {
    "keras": "3.13.0",
    "mlflow": "3.17.2",
    "pillow": "12.0.0",
    "numpy": "2.3.0",
    "scikit-learn": "1.7.0",
    "scipy": "1.16.0",
}


@pytest.mark.parametrize(
    "tensorflow, pin",
    [
        ({"tensorflow": "2.21.0"}, "tensorflow==2.21.0"),  # the GPU image (tensorflow/tensorflow:2.21.0-gpu)
        ({"tensorflow-cpu": "2.21.0"}, "tensorflow-cpu==2.21.0"),  # this machine
    ],
)
def test_registered_requirements_name_tensorflow_however_it_was_installed(tensorflow, pin):
    from xray.serving.bundle import pip_requirements

    pins = pip_requirements(_installed(RUNTIME | tensorflow))
    assert pins[0] == pin and "mlflow==3.17.2" in pins and len(pins) == 1 + len(RUNTIME)


def test_registered_requirements_refuse_a_missing_tensorflow_or_runtime_package():
    from xray.serving.bundle import pip_requirements

    with pytest.raises(RuntimeError, match="no TensorFlow distribution"):
        pip_requirements(_installed(RUNTIME))
    with pytest.raises(RuntimeError, match="scipy is not installed"):
        pip_requirements(_installed({k: v for k, v in RUNTIME.items() if k != "scipy"} | {"tensorflow": "2.21.0"}))
    assert any(p.startswith(("tensorflow==", "tensorflow-cpu==")) for p in pip_requirements())  # this environment


def test_sagemaker_docs_say_how_to_delete_the_eventbridge_schedule():
    docs = (ROOT / "docs" / "sagemaker.md").read_text()
    assert "aws scheduler delete-schedule --name" in docs
    assert "ZenML removes the EventBridge schedule" not in docs


def test_the_multi_gpu_config_is_the_single_gpu_one_with_four_gpus_mirrored():
    """configs/training_sagemaker_multi_gpu.yaml validates like training_sagemaker.yaml and differs from it only in
    the train step's instance and the strategy."""
    import yaml
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration
    from zenml.integrations.aws.flavors.sagemaker_step_operator_flavor import SagemakerStepOperatorSettings

    multi_path = ROOT / "configs" / "training_sagemaker_multi_gpu.yaml"
    multi = load_config(multi_path)
    zenml_config = PipelineRunConfiguration.model_validate(multi.zenml)
    step = SagemakerStepOperatorSettings.model_validate(
        zenml_config.steps["train_model"].settings["step_operator.sagemaker"].model_dump()
    )
    assert step.estimator_args["instance_type"] == "ml.g5.12xlarge" and multi.train.distribution == "mirrored"
    one, four = yaml.safe_load(CONFIG.read_text()), yaml.safe_load(multi_path.read_text())
    arguments = four["zenml"]["steps"]["train_model"]["settings"]["step_operator.sagemaker"]["estimator_args"]
    arguments["instance_type"] = "ml.g5.xlarge"
    del four["train"]["distribution"]
    assert four == one
