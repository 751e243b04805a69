"""``s3:``, the S3 endpoint the dataset archive is staged behind and read from."""

from __future__ import annotations

from pydantic import Field

from xray.config.base import Section


class S3Config(Section):
    embedded: bool = Field(True, description="Stage the archive behind a local moto S3 endpoint (production's path).")
    bucket: str = "chest-xray"
    key: str = "chest_xray.zip"
    max_attempts: int = Field(5, ge=1, le=20, description="botocore standard-mode retry attempts.")
    connect_timeout_s: float = Field(10, gt=0)
    read_timeout_s: float = Field(60, gt=0)
