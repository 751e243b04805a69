"""One request per job: what the command line asked for, validated once, handed whole to the launcher, the pipeline
and its steps (so it lives below them all, beside the config). Each command of ``python3 run.py`` (cli/) builds one
of these; their validators hold the rules of which option goes with which (an option that belongs to another job is
not a field here at all)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from xray.config.pipeline import PipelineConfig
from xray.config.tuning import TuningConfig

DICOMWEB = ("dicomweb://", "dicomwebs://")


class JobRequest(BaseModel):
    """What every job carries: the validated config (the YAML, with --seed applied and the stack's tracking URI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    config: PipelineConfig

    def on(self, config: PipelineConfig):
        """The same request with ``config`` (the stack's tracking URI pinned by the launcher)."""
        return self.model_copy(update={"config": config})


class TrainingRequest(JobRequest):
    """``train``: the dataset archive (else the config's, $CHEST_XRAY_ZIP, ../shared, Kaggle), cache use, a
    schedule instead of a run, or a run only when a source changed."""

    dataset_uri: str | None = None
    no_cache: bool = False
    schedule: str | None = Field(None, description='e.g. "cron(0 3 ? * MON *)"')
    if_changed: bool = False

    @model_validator(mode="after")
    def _if_changed_runs_now(self):
        if self.if_changed and self.schedule:
            raise ValueError(
                "--if-changed checks once, before a launch; a --schedule runs the pipeline itself, where unchanged "
                "sources make every step a cache hit and register nothing (README, 'Scheduled retraining')"
            )
        return self


class TuningRequest(JobRequest):
    """``tune``: the search of the config's ``tuning:`` section, its winner trained and registered."""

    dataset_uri: str | None = None
    no_cache: bool = False

    @model_validator(mode="after")
    def _has_a_search(self):
        if self.config.tuning is None:
            raise ValueError("tune needs a `tuning:` section in the config (see configs/tuning_smoke.yaml)")
        return self

    @property
    def search(self) -> TuningConfig:
        """The config's ``tuning:`` section, which the validator requires."""
        assert self.config.tuning is not None
        return self.config.tuning


class VersionRequest(JobRequest):
    """A job against a registered version: a number, or an alias such as ``champion`` (pinned when the run starts)."""

    model_version: str = "champion"


class Int8Request(VersionRequest):
    """``int8``: an int8 model made for a registered version that has none, under registration's val control, on the
    split of the data it was trained on (``dataset_uri``: else the config's, as for train)."""

    dataset_uri: str | None = None


class InferenceRequest(VersionRequest):
    """``infer``: predictions of ``images`` streamed into ``output``; with ``write_back`` one report per analysed image
    into the PACS the images came from and, with ``heatmaps``, each ``ok`` image's Grad-CAM beside it."""

    images: str
    output: str = "outputs/predictions.csv"
    resume: bool = False
    explain: int = Field(0, ge=0)
    write_back: bool = False
    heatmaps: bool = False
    site: str | None = None
    shards: int = Field(1, ge=1, le=64)

    @field_validator("output")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return value if value.startswith("s3://") else str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _options_go_together(self):
        if self.heatmaps and not (self.write_back and self.images.startswith(DICOMWEB)):
            raise ValueError(
                "--heatmaps needs --write-back and --images dicomweb://HOST:PORT/ROOT (each ok image's heatmap is "
                "stored in its study in the PACS it came from)"
            )
        if self.write_back and not self.images.startswith(DICOMWEB):
            raise ValueError("--write-back needs --images dicomweb://HOST:PORT/ROOT (a PACS to write reports back to)")
        if self.shards > 1 and self.explain:
            raise ValueError("--shards needs no --explain (Grad-CAM picks its images from one stream)")
        return self

    @property
    def gradcam_folder(self) -> Path:
        """Where the Grad-CAM overlays go: beside a local output, else under outputs/."""
        return Path("outputs") if self.output.startswith("s3://") else Path(self.output).parent


class MonitoringRequest(VersionRequest):
    """``monitor``: a batch of ``images`` against the version's reference profile, or (``from_log``) the prediction
    log's performance estimated per period, site and version, with a verdict on each, no label read; the report under
    ``output``."""

    model_version: str | None = None  # type: ignore[assignment]  # none with from_log, unlike other version jobs
    """A batch's version (``champion`` when not given); none with ``from_log``, which estimates every version."""
    images: str | None = None
    output: Path = Path("outputs/monitoring")
    fail_on_drift: bool = False
    from_log: bool = False

    @model_validator(mode="before")
    @classmethod
    def _champion_by_default(cls, data):
        if isinstance(data, dict) and not data.get("from_log") and data.get("model_version") is None:
            return {**data, "model_version": "champion"}
        return data

    @model_validator(mode="after")
    def _a_batch_or_the_log(self):
        if not self.from_log:
            if self.images is None:
                raise ValueError("monitor needs --images (a batch to check) or --from-log (the prediction log)")
            return self
        given = ["--images"] * (self.images is not None) + ["--fail-on-drift"] * self.fail_on_drift
        given += ["--model-version"] * (self.model_version is not None)
        if given:
            raise ValueError(
                f"--from-log estimates every version in the prediction log; {' and '.join(given)} "
                f"belong{'s' * (len(given) == 1)} to a batch (monitor --images)"
            )
        return self


class EvaluationRequest(VersionRequest):
    """``evaluate``: the version on a labelled site (NORMAL/ and PNEUMONIA/ folders at any depth)."""

    dataset_uri: str
    site: str | None = None
    recalibrate_fraction: float | None = Field(None, gt=0, lt=1)


class FeedbackRequest(JobRequest):
    """``feedback``: readers' labels joined to the prediction log, performance per period, site and version."""

    labels: Path
    period: Literal["day", "week", "month"] | None = None
    site: str | None = None
    output: Path = Path("outputs/feedback")
    fail_on_degradation: bool = False

    @field_validator("labels")
    @classmethod
    def _resolved(cls, value: Path) -> Path:
        return value.expanduser().resolve()


class NodeRequest(VersionRequest):
    """``node``: the DICOM node on the champion (``config.node``, with the command line's flags applied by the CLI);
    it runs until SIGTERM or Ctrl-C. ``prediction_log``: a folder, an s3:// prefix or ``off``; None: the stack's."""

    prediction_log: str | None = None

    @model_validator(mode="after")
    def _a_node_needs_somewhere_to_send(self):
        if not self.config.node.destinations:
            raise ValueError(
                "node needs at least one --destination (dicom://AE@HOST:PORT or dicomweb://HOST:PORT/dicom-web): "
                "a result that goes nowhere is never seen"
            )
        return self


class DecisionRequest(JobRequest):
    """``approve``, ``reject``, ``rollback``: a person's decision on a version, recorded with who and why."""

    action: Literal["approve", "reject", "rollback"]
    model_version: str
    reason: str
    reviewer: str | None = None
    operating_point: str | None = Field(None, description="approve SITE:ID: a site's proposed operating point")

    @field_validator("model_version")
    @classmethod
    def _a_number(cls, value: str) -> str:
        if not value.isdigit():
            raise ValueError(f"a decision names a version number, not {value!r}")
        return value

    @model_validator(mode="after")
    def _operating_point_is_approved(self):
        if self.operating_point is not None:
            if self.action != "approve":
                raise ValueError("--operating-point belongs to approve")
            if not re.fullmatch(r"[^:]+:[0-9a-f]{1,64}", self.operating_point):
                raise ValueError("--operating-point takes SITE:ID (the ID the evaluation's summary printed)")
        return self


class AuditRequest(JobRequest):
    """``audit verify``, ``audit show [--json]``, ``audit approve-plan``: the audit trail on the stack's artifact
    store, checked, listed, or given the reviewer's approval of the config's change plan."""

    action: Literal["verify", "show", "approve-plan"]
    as_json: bool = False
    reviewer: str | None = None
    reason: str | None = None

    @model_validator(mode="after")
    def _options_go_together(self):
        if self.as_json and self.action != "show":
            raise ValueError("--json belongs to audit show")
        if self.action == "approve-plan":
            if self.config.change_plan is None:
                raise ValueError("audit approve-plan needs a config with a change_plan section")
            if not (self.reason or "").strip():
                raise ValueError("audit approve-plan needs --reason (why the reviewer approves it goes on the record)")
        elif self.reviewer is not None or self.reason is not None:
            raise ValueError("--reviewer and --reason belong to audit approve-plan")
        return self


def first_error(error) -> str:
    """A pydantic ValidationError as the one line a person reads."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__")
    message = first.get("msg", str(error)).removeprefix("Value error, ")
    return f"{where}: {message}" if where and first.get("type") != "value_error" else message
