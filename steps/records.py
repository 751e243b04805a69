"""What the batch, monitoring, feedback and site-evaluation steps hand on: each step's summary line as a record (JSON in
the artifact store, shown by the dashboard), beside the tables and figures they also output."""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchPrediction:
    """A predict step's result: its summary line (counts, output, operating point, runtime, the prediction log's rows,
    the PACS write-back's) and the rows most worth a Grad-CAM look."""

    summary: dict[str, Any]
    to_explain: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class MergedPredictions:
    """The shards' parts merged into one output."""

    output: str
    rows_written: int
    parts: list[str]


@dataclass
class MonitoringReport:
    """The batch against the version's reference profile: the drift report (tests, shares, headline, next step) and
    the page that shows it."""

    report: dict[str, Any]
    html: str


@dataclass
class FeedbackSummary:
    """The labels joined to the prediction log: counts, the key they were joined on, alerts, each version's test AUC."""

    summary: dict[str, Any]


@dataclass
class SiteEvaluation:
    """A version on a labelled site: metrics with CIs at its operating point (and re-fitted), the run, what was
    stored or proposed."""

    summary: dict[str, Any]


@dataclass
class EstimatedPerformance:
    """Performance estimated from the prediction log before the labels (xray.monitoring.performance.comparison's
    summary: counts, alerts, every group's estimate with its band and verdict) and one printable line per group."""

    summary: dict[str, Any]
    lines: list[str] = field(default_factory=list)
