"""``data:``, the labelled sources trained on, how their patients are split, and what a dataset may hold."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from xray.config.base import Section
from xray.config.limits import ArchiveLimits


class SourceConfig(Section):
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


class SplitFractions(Section):
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


class DataConfig(Section):
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
