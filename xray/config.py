"""One validated config model for every knob of the pipeline. The YAML keys in ``configs/*.yaml``, the step
parameters, the MLflow params (flattened with dots, e.g. ``train.batch_size``) and the docs all use these names."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from xray.limits import ArchiveLimits, DecodeLimits, PacsLimits


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Config(_Section):
    embedded: bool = Field(True, description="Stage the archive behind a local moto S3 endpoint (production's path).")
    bucket: str = "chest-xray"
    key: str = "chest_xray.zip"
    max_attempts: int = Field(5, ge=1, le=20, description="botocore standard-mode retry attempts.")
    connect_timeout_s: float = Field(10, gt=0)
    read_timeout_s: float = Field(60, gt=0)


class SourceConfig(_Section):
    """One labelled source of training data (docs/USER_GUIDE.md, "Several sources")."""

    site: str = Field(..., max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The site's name.")
    uri: str | None = Field(
        None,
        description="A zip (local, file:// or s3://), a local folder or an s3:// prefix of JPEG/PNG/DICOM at any depth. "
        "null: the dataset archive (dataset_uri / --dataset-uri / $CHEST_XRAY_ZIP / ../shared / Kaggle).",
    )
    labels: str | None = Field(
        None,
        description="A CSV (local or s3://) with a `label` column and a `file` (file name) or `sop_instance_uid` "
        "column; without it, labels come from NORMAL/ and PNEUMONIA/ folders.",
    )
    splits: Literal["auto", "archive", "patient"] = Field(
        "auto",
        description="archive: the source's own train/ and test/ (val/) folders; patient: every patient to "
        "train/val/test by a keyed hash (data.split); auto: archive when the source has train/ and test/ folders.",
    )


class SplitFractions(_Section):
    """Where the patients of a source without its own test split go, by a keyed hash of the patient."""

    val: float = Field(0.15, gt=0, lt=0.5)
    test: float = Field(0.15, gt=0, lt=0.5)
    key: str = Field(
        "xray-pipeline-splits-v1",
        min_length=1,
        description="Keys the hash: a patient's split depends only on this key, the site and the patient. Never "
        "change it for a site already trained on: a new key sends earlier test patients to train.",
    )

    @property
    def train(self) -> float:
        return 1.0 - self.val - self.test


BASE_SITE = "guangzhou"


class DataConfig(_Section):
    sources: tuple[SourceConfig, ...] = Field(
        (SourceConfig(site=BASE_SITE),),
        min_length=1,
        description="Labelled sources trained on together; exactly one has uri null (the dataset archive, with its own "
        "train/test). The default is that archive alone, as site guangzhou (Kermany's Guangzhou children).",
    )
    split: SplitFractions = SplitFractions()
    min_val_per_class: int = Field(50, ge=1, description="Carve val from train when val has fewer per class.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    max_train_per_class: int | None = Field(None, ge=1, description="Cap train images per class (smoke runs).")
    max_eval_per_class: int | None = Field(None, ge=1, description="Cap val and test images per class (smoke runs).")
    limits: ArchiveLimits = ArchiveLimits()

    @field_validator("sources")
    @classmethod
    def _one_archive(cls, sources: tuple[SourceConfig, ...]) -> tuple[SourceConfig, ...]:
        if sum(source.uri is None for source in sources) != 1:
            raise ValueError(
                "exactly one source must be the dataset archive (uri: null; its URI comes from dataset_uri or "
                "--dataset-uri)"
            )
        names = [source.site.lower() for source in sources]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"site names must be unique: {repeated} repeated")
        for source in sources:
            if source.uri is None and (source.labels or source.splits == "patient"):
                raise ValueError(f"{source.site}: the dataset archive keeps its own splits and folder labels")
        return sources

    @property
    def base_site(self) -> str:
        return next(source.site for source in self.sources if source.uri is None)

    @property
    def extra_sources(self) -> tuple[SourceConfig, ...]:
        return tuple(source for source in self.sources if source.uri is not None)


class Augmentation(_Section):
    horizontal_flip: bool = True
    zoom: float = Field(0.1, ge=0, lt=1)
    rotation: float = Field(0.0, ge=0, le=0.5, description="Fraction of a full turn, as keras.layers.RandomRotation.")
    contrast: float = Field(0.0, ge=0, lt=1)
    brightness: float = Field(0.0, ge=0, lt=1)
    translation: float = Field(0.0, ge=0, lt=0.5, description="Random shift, as a fraction of the image side.")
    stretch: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Random aspect-ratio change: width scaled by 1 + s and height by 1 - s, "
        "s uniform in +/- stretch. Archives resized to a square squash each radiograph by its original aspect ratio.",
    )
    mixup: float = Field(
        0.0,
        ge=0,
        le=1,
        description="> 0: mix each training image and its label with another of the batch, weight "
        "lambda ~ Beta(mixup, mixup); class weights are mixed the same way. Softens what noisy train labels teach.",
    )
    interpolation: Literal["bilinear", "nearest"] = Field(
        "bilinear", description="Resampling for flip/zoom/rotation; nearest is about twice as fast on CPU."
    )

    @property
    def enabled(self) -> bool:
        return self.horizontal_flip or any(
            (self.zoom, self.rotation, self.contrast, self.brightness, self.translation, self.stretch)
        )


class ModelConfig(_Section):
    backbone: Literal["resnet50v2", "efficientnetv2b0", "mobilenetv3large"] = Field(
        "resnet50v2", description="keras.applications backbone under the classifier head; ResNet50V2 is the default."
    )
    weights: str = Field("none", description="'imagenet', 'none', or a local or s3:// path to a Keras weights file.")
    image_size: int = Field(128, ge=32, le=1024)
    input_normalization: Literal["fixed", "per_image"] = Field(
        "fixed",
        description="fixed: the backbone's [-1, 1] scaling. per_image: standardise each image to zero mean and "
        "unit variance inside the model, so exposure and contrast differences between sites cannot move the score.",
    )
    dense_units: int = Field(128, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)


class TrainConfig(_Section):
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="cosine: linear warm-up, then cosine decay to 1% of learning_rate by the last epoch of each phase.",
    )
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up from 10% of learning_rate (cosine schedule only).")
    weight_decay: float = Field(
        0.0, ge=0, lt=1, description="> 0: AdamW with this decoupled weight decay instead of Adam."
    )
    frozen_epochs: int = Field(2, ge=0, description="With pretrained weights: epochs with the backbone frozen.")
    fine_tune_layers: int = Field(
        30, ge=0, description="With pretrained weights: top backbone layers unfrozen after the frozen phase."
    )
    fine_tune_learning_rate: float = Field(1e-5, gt=0)
    early_stopping_patience: int = Field(3, ge=1)
    class_weighting: bool = True
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    augmentation: Augmentation = Augmentation()
    mixed_precision: Literal["auto", "on", "off"] = Field("auto", description="auto: on when a GPU is present.")
    jit_compile: Literal["auto", "on", "off"] = Field("auto", description="XLA. auto: on when a GPU is present.")
    # auto: mirrored with several GPUs. batch_size is per replica; learning rates scale with replicas (USER_GUIDE).
    distribution: Literal["auto", "none", "mirrored"] = Field("auto", description="TensorFlow distribution strategy.")
    backup_dir: str | None = Field(None, description="BackupAndRestore root; a run of the same config resumes from it.")


class EvaluateConfig(_Section):
    threshold_policy: Literal["min_sensitivity", "youden", "fixed"] = "min_sensitivity"
    min_sensitivity: float = Field(0.95, gt=0, le=1)
    fixed_threshold: float = Field(0.5, gt=0, lt=1)
    bootstrap_samples: int = Field(1000, ge=100)
    calibration: Literal["platt", "temperature", "none"] = Field(
        "platt",
        description="Fitted on val after training and saved inside the model: platt (temperature and bias), "
        "temperature (temperature only) or none. The threshold policy then runs on calibrated val probabilities.",
    )
    site_experiment_name: str = Field(
        "chest-xray-evaluation", description="MLflow experiment of `--pipeline evaluation` runs (one per site)."
    )
    min_recalibration_per_class: int = Field(
        30,
        ge=2,
        description="Images of each class a site's own operating point is fitted on at least (--recalibrate-fraction"
        "'s share, a site's val at training); docs/USER_GUIDE.md says why.",
    )


class MonitoringConfig(_Section):
    """Out-of-distribution detection per image and drift per batch (docs/MONITORING.md)."""

    ood_alpha: float = Field(
        0.01,
        gt=0,
        le=0.2,
        description="Nominal share of in-distribution images flagged out of distribution: the "
        "threshold is the 1 - ood_alpha quantile of the combined detector statistic, fitted on val.",
    )
    content_components: int = Field(16, ge=1, le=256, description="Principal components of the content detector.")
    neighbours: int = Field(20, ge=1, description="Nearest training images the content score averages over.")
    aspect_ratio_tolerance: float = Field(
        1.5,
        ge=1,
        description="Aspect ratios beyond the train split's by more than this factor are out of distribution.",
    )
    drift_alpha: float = Field(0.01, gt=0, lt=1, description="Significance level of the batch-level drift test.")
    permutations: int = Field(1000, ge=100, description="Resamples of the MMD permutation test on the embeddings.")
    experiment_name: str = "chest-xray-monitoring"
    # Where every prediction is logged: <artifact store>/prediction_log, a folder, an s3:// prefix, or off.
    prediction_log: str = Field("artifact-store", description="artifact-store, a folder, an s3:// prefix or off.")
    feedback_period: Literal["day", "week", "month"] = "week"
    feedback_min_per_class: int = Field(
        20,
        ge=1,
        description="Labelled answers of each class an alert's metric is computed on (sensitivity: PNEUMONIA).",
    )
    feedback_experiment_name: str = "chest-xray-feedback"


SCOPE_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "PatientAge")


class ScopeConfig(_Section):
    """The images a version is validated for, checked per DICOM image from its header before its pixels are trusted
    (docs/USER_GUIDE.md, "DICOM"). Stored with each registered version and shown in its model card."""

    modalities: tuple[str, ...] = Field(("CR", "DX"), min_length=1, description="Modality values in scope.")
    body_parts: tuple[str, ...] = Field(
        ("CHEST",), min_length=1, description="BodyPartExamined values in scope (checked when the tag is present)."
    )
    views: tuple[str, ...] = Field(
        ("PA", "AP"), min_length=1, description="ViewPosition values in scope (LL, RL, LATERAL are out)."
    )
    age_years: tuple[float, float] = Field(
        (1, 5),
        description="Validated ages in completed years, both ends included (the Guangzhou children were 1 to 5): "
        "PatientAge, else StudyDate - PatientBirthDate.",
    )
    required: tuple[str, ...] = Field(
        (),
        description=f"Tags whose absence puts an image out of scope ({', '.join(SCOPE_TAGS)}); a missing tag that is "
        "not required is recorded in scope_unchecked and the image is still answered.",
    )

    @field_validator("modalities", "body_parts", "views")
    @classmethod
    def _upper(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(value.strip().upper() for value in values)

    @field_validator("age_years")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError("must be [youngest, oldest] with 0 <= youngest <= oldest")
        return value

    @field_validator("required")
    @classmethod
    def _known(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(values) - set(SCOPE_TAGS))
        if unknown:
            raise ValueError(f"unknown tag(s) {unknown}; choose from {list(SCOPE_TAGS)}")
        return values


class InferenceConfig(_Section):
    """Batch inference and monitoring: one stream from the source to the predictions file (xray/serving/batch.py)."""

    batch_size: int = Field(32, ge=1, le=1024, description="Images per compiled model call.")
    fetch_workers: int = Field(
        8, ge=1, le=64, description="Threads that fetch, decode and screen images ahead of the model."
    )
    window: int = Field(
        64,
        ge=1,
        le=4096,
        description="Images in flight between fetching and the model: with batch_size, what bounds memory.",
    )
    runtime: Literal["auto", "keras", "openvino"] = Field(
        "auto",
        description="What runs the model: auto is OpenVINO bf16 where the CPU has BF16, else Keras (predictor.py).",
    )
    decode: DecodeLimits = DecodeLimits()
    pacs: PacsLimits = PacsLimits()
    experiment_name: str = "chest-xray-inference"


class SearchRange(_Section):
    """A numeric range of the search space; ``log`` samples evenly in log space, ``integer`` rounds."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    @field_validator("high")
    @classmethod
    def _above_low(cls, value: float, info) -> float:
        if "low" in info.data and value <= info.data["low"]:
            raise ValueError("must be above low")
        return value


class SearchChoice(_Section):
    """Values to choose from, each equally likely."""

    choices: list[Any] = Field(..., min_length=1)


class TuningConfig(_Section):
    """Hyperparameter search (``--pipeline tuning``): trials of the config's own keys, chosen on val AUC only."""

    trials: int = Field(6, ge=1, le=200)
    sampler: Literal["sobol", "random"] = Field(
        "sobol", description="sobol: scrambled quasi-random points that cover the space evenly; random: uniform."
    )
    epochs: int = Field(3, ge=1, description="Epochs per trial; the winner is then trained for train.epochs.")
    space: dict[str, SearchRange | SearchChoice] = Field(
        ...,
        min_length=1,
        description="Dotted config keys (train.learning_rate, model.dropout, train.augmentation.zoom, "
        "model.image_size, model.backbone, ...) to a range {low, high, log, integer} or {choices: [...]}.",
    )
    trial_values: dict[str, Any] = Field(
        default_factory=dict,
        description="Fixed values for the trials only, a cheaper proxy (model.image_size: 96); the winner is trained "
        "with the config's own values for these keys.",
    )
    experiment_name: str = "chest-xray-tuning"

    @field_validator("space", mode="before")
    @classmethod
    def _one_kind_each(cls, space: Any) -> Any:
        # A mapping with "choices" is a choice, any other a range: one error message per key, not one per union member.
        if not isinstance(space, dict):
            return space
        parsed = {}
        for key, value in space.items():
            kind = SearchChoice if isinstance(value, dict) and "choices" in value else SearchRange
            try:
                parsed[key] = kind.model_validate(value)
            except ValidationError as error:
                raise ValueError(f"{key}: {describe_error(error)}") from None
        return parsed


# The registered model's name: the one default every config, script and pipeline takes it from.
MODEL_NAME = "chest-xray-classifier"


class RegistryConfig(_Section):
    model_name: str = MODEL_NAME
    experiment_name: str = "chest-xray-training"
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; MLFLOW_TRACKING_URI overrides; default: sqlite under .mlflow/."
    )
    champion_alias: str = "champion"
    require_approval: bool = Field(False, description="A version that passes the gate waits as candidate for approve.")
    candidate_alias: str = "candidate"
    margin: float = Field(
        0.01,
        ge=0,
        lt=0.5,
        description="Non-inferiority margin of the promotion gate: the lower bound of the paired "
        "bootstrap 95% CI of AUC(challenger) - AUC(champion) must be at least -margin, on test and on every gate site.",
    )
    gate_subgroups: bool = Field(False, description="Also gate on each DICOM subgroup of test (age band, sex...).")
    gate_subgroup_min_per_class: int = Field(20, ge=2, description="Images of each class a gated subgroup needs.")
    gate_sites: tuple[str, ...] = Field(
        (),
        description="Labelled sites (archive or folder URIs with NORMAL/ and PNEUMONIA/ "
        "folders) on which the challenger must also be non-inferior to the champion before promotion.",
    )


class PipelineConfig(_Section):
    dataset_uri: str | None = Field(
        None,
        description="s3://bucket/key.zip, a local path or file://. None: CHEST_XRAY_ZIP, ../shared, then kagglehub.",
    )
    expected_sha256: str | None = Field(None, description="Fail before extraction when the archive differs.")
    seed: int = 42
    s3: S3Config = S3Config()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    inference: InferenceConfig = InferenceConfig()
    scope: ScopeConfig = ScopeConfig()
    registry: RegistryConfig = RegistryConfig()
    tuning: TuningConfig | None = Field(None, description="The search of --pipeline tuning; unused by other pipelines.")
    zenml: dict[str, Any] | None = Field(
        None,
        description="ZenML run configuration (settings, steps.<name>.step_operator, ...), handed to ZenML as is; "
        "ZenML validates it. This is where a stack's step operator and Docker settings are chosen.",
    )

    @field_validator("expected_sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())):
            raise ValueError("must be 64 hex characters")
        return value.lower() if value else value

    def flat_params(self) -> dict[str, Any]:
        """Dotted names, as logged to MLflow: ``train.batch_size`` etc."""
        return flatten(self.model_dump(mode="json", exclude={"zenml"}))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def describe_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        parts.append(f"{field}: {message}")
    return "; ".join(parts)
