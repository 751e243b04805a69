"""The way to champion as steps the dashboard shows: the gate's image sets, both models scored on them, the gate's
decision (pure), the version's int8 under its val control, then registration and promotion
(xray.registry.promotion)."""

import logging
from typing import Annotated, Tuple

import keras
import mlflow
from mlflow.tracking import MlflowClient
from zenml import get_step_context, log_metadata, step

from materializers import Int8OutcomeMaterializer, ValidatedDatasetMaterializer
from steps.caching import DOMAIN_CODE, domain_code_hash
from steps.logstore import audit_trail
from steps.scratch import output_folder
from steps.tracking import log_config, mlflow_run
from xray.config.pipeline import PipelineConfig
from xray.config.registry import RegistryConfig
from xray.data import inputs
from xray.data.dataset import ValidatedDataset
from xray.data.manifest import DataReport
from xray.evaluation.recipes import Evaluation
from xray.model.training import History
from xray.monitoring.ood import ReferenceProfile
from xray.registry import gate, promotion
from xray.registry.control import audit, plan
from xray.registry.store import ModelInfo
from xray.requests import Int8Request
from xray.serving.bundle import VersionFiles
from xray.serving.runtimes import int8
from xray.serving.runtimes.int8 import Int8Outcome

logger = logging.getLogger(__name__)


@step(
    output_materializers={"gate_site_images": ValidatedDatasetMaterializer},
    cache_policy=DOMAIN_CODE,
    experiment_tracker=True,
)
def load_gate_sets(
    dataset: ValidatedDataset, spec: inputs.DatasetSpec, config: PipelineConfig
) -> Tuple[Annotated[promotion.GateSets, "gate_sets"], Annotated[ValidatedDataset, "gate_site_images"]]:
    """What the challenger is compared with the champion on: shares of the test split and the labelled gate sites."""
    sets, site_images = promotion.load_gate_sets(
        MlflowClient(), dataset, spec, config, output_folder("gate_site_images")
    )
    return sets, site_images  # a tuple written out: ZenML reads the return statement to count the outputs


@step(cache_policy=DOMAIN_CODE, experiment_tracker=True)
def score_candidates(
    model: keras.Model,
    dataset: ValidatedDataset,
    spec: inputs.DatasetSpec,
    gate_sets: promotion.GateSets,
    gate_site_images: ValidatedDataset,
    evaluation: Evaluation,
    config: PipelineConfig,
) -> Annotated[gate.Scores, "gate_scores"]:
    """The challenger's and the champion's probabilities on every gate set (the champion's own verified folder)."""
    return promotion.score_candidates(model, dataset, spec, gate_sets, gate_site_images, evaluation, config)


@step(cache_policy=DOMAIN_CODE)
def decide_promotion(
    gate_scores: gate.Scores,
    gate_sets: promotion.GateSets,
    evaluation: Evaluation,
    data_report: DataReport,
    spec: inputs.DatasetSpec,
    config: PipelineConfig,
) -> Annotated[gate.PromotionDecision, "gate_decision"]:
    """The gate's rule on the paired scores (xray.registry.gate): sensitivity floor, then non-inferiority; under a
    change plan (xray.registry.control.plan) the candidate classified against the champion first, and the plan's
    criteria as the rule."""
    evaluate, registry = config.evaluate, config.registry
    if config.change_plan is None:
        rule = (evaluate.min_sensitivity, registry.margin, evaluate.bootstrap_samples, config.seed)
        decision = gate.decide_on(gate_scores, evaluation.flat["test_sensitivity"], *rule)
    else:
        lineage = promotion.training_data(data_report.to_dict())
        candidate = plan.version_record(config, domain_code_hash(), lineage, spec.preprocessing)
        measured = (evaluation.flat["test_sensitivity"], evaluation.report, audit_trail().approved_plans())
        champion = gate_sets.champion_record
        decision = plan.judge(config, gate_scores, champion, candidate, (*measured, evaluate.bootstrap_samples))
    logger.info("gate: %s (%s)", "passed" if decision.promoted else "not passed", decision.reason)
    return decision


@step(output_materializers={"int8": Int8OutcomeMaterializer}, cache_policy=DOMAIN_CODE, experiment_tracker=True)
def quantize_int8(
    model: keras.Model,
    dataset: ValidatedDataset,
    spec: inputs.DatasetSpec,
    evaluation: Evaluation,
    registry: RegistryConfig,
    seed: int,
) -> Annotated[Int8Outcome, "int8"]:
    """The version's int8 (OpenVINO, NNCF with accuracy control): calibrated on train, controlled on val at the
    version's threshold (registry.int8); registered with it only where it passed."""
    recipe = int8.Recipe.of(registry.int8)
    if not registry.int8.enabled:
        return Int8Outcome.not_made(recipe)
    outcome = int8.make(model, dataset, spec.image_size, evaluation.threshold, registry.int8, seed)
    with mlflow_run():
        log_config(registry=registry)
        mlflow.set_tag("int8", outcome.state)
        mlflow.log_metrics(outcome.metrics())
    return outcome


@step(output_materializers={"int8": Int8OutcomeMaterializer}, enable_cache=False, experiment_tracker=True)
def quantize_version(
    model_info: ModelInfo, dataset: ValidatedDataset, data_report: DataReport, request: Int8Request
) -> Annotated[Int8Outcome, "int8"]:
    """``int8`` on request: a registered version's int8 under registration's val control, stored and sealed with it
    where the split is the one it was trained on (xray.registry.promotion.quantize_registered)."""
    config = request.config
    with mlflow_run():
        log_config(registry=config.registry, model_version=model_info.version)
        outcome = promotion.quantize_registered(
            MlflowClient(), model_info.version, dataset, data_report.to_dict(), config
        )
        mlflow.set_tag("int8", outcome.state)
        mlflow.log_metrics(outcome.metrics())
    return outcome


@step(cache_policy=DOMAIN_CODE, experiment_tracker=True)
def register_and_promote(
    model: keras.Model,
    evaluation: Evaluation,
    gate_decision: gate.PromotionDecision,
    data_report: DataReport,
    history: History,
    reference_profile: ReferenceProfile,
    int8: Int8Outcome,
    config: PipelineConfig,
) -> Annotated[promotion.Registration, "registration"]:
    """Register a new MLflow model version with its card, its reference profile and its int8 (where it passed), and
    seal its files; it becomes champion only through the gate's decision (or, with registry.require_approval, a
    candidate for a reviewer)."""
    report = data_report.to_dict()
    training = history.model | {
        "epochs_run": history.throughput["epochs_run"],
        "dataset_sha256": report["sites"][config.data.base_site]["digest"],
    }
    files = VersionFiles(model, reference_profile, int8)
    with mlflow_run():
        log_config(registry=config.registry)
        client = MlflowClient()  # the stack's tracking server: its experiment tracker set the URI
        registration = promotion.register_and_promote(
            client, files, evaluation, gate_decision, training, report, config
        )
    follow_in_zenml(client, registration, evaluation.flat, config)
    record_in_trail(registration, gate_decision, config)
    return registration


def record_in_trail(registration: promotion.Registration, decision: gate.PromotionDecision, config) -> None:
    """The audit trail's records of a training run: the plan version (the first run under it), the gate's decision
    and the registration, as the run's MLflow account."""
    trail, who = audit_trail(), audit.account(config.registry.tracking_uri)
    control, version = decision.change_control, registration.model_version
    if control and not trail.has_plan(control["plan_digest"]):
        details = {"plan_version": control["plan_version"], "plan_digest": control["plan_digest"]}
        details["plan"] = config.change_plan.model_dump(mode="json")
        trail.append("plan version", who, f"first training run under change plan v{control['plan_version']}", details)
    about = {
        "model_name": registration.model_name,
        "model_version": version,
        "mlflow_run_id": registration.mlflow_run_id,
    }
    outcome = (
        "promoted" if registration.promoted else "pending approval" if registration.pending_approval else "not promoted"
    )
    changes = [{k: c[k] for k in ("what", "modification", "in_plan")} for c in control.get("changes", [])]
    gated = {"decision": outcome, "champion": registration.previous_champion, "changes": changes}
    gated |= {k: control.get(k) for k in ("plan_version", "plan_digest", "in_plan")} if control else {}
    trail.append("gate decision", who, registration.reason[:4000], about | gated)
    trail.append(
        "registration", who, f"registered by the training pipeline: {outcome}", about | {"impact_report": bool(control)}
    )


def follow_in_zenml(client, registration: promotion.Registration, flat: dict, config: PipelineConfig) -> None:
    """One source of truth, the MLflow alias (read by batch inference, serving and the gate): the ZenML Model version of
    this run follows it (staging while a reviewer decides, production once champion), and records the version."""
    zenml_model = get_step_context().model
    client.set_model_version_tag(
        config.registry.model_name, registration.model_version, "zenml.model_version_id", str(zenml_model.id)
    )
    if registration.pending_approval:
        zenml_model.set_stage("staging", force=True)
        logger.info("ZenML Model version of this run: stage staging (pending approval in MLflow)")
    if registration.promoted:
        zenml_model.set_stage("production", force=True)
        logger.info("ZenML Model version of this run: stage production (follows the MLflow alias)")
    log_metadata(
        metadata={
            "mlflow_model_version": registration.model_version,
            "mlflow_model_uri": registration.model_uri,
            "promoted": registration.promoted,
            "test_auc": flat["test_auc"],
            "test_sensitivity": flat["test_sensitivity"],
        },
        infer_model=True,
    )
