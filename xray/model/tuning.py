"""Hyperparameter search: seeded trials over the config's own keys, each trained and scored on val only.

The trials are plain config overrides (``{"train.learning_rate": 3e-4, "model.dropout": 0.3}``), drawn before the
pipeline starts, so the search is a pipeline parameter that can be read and rerun. A trial that fails or diverges
(a non-finite loss) is recorded as failed and left out of the selection; the search fails only when every trial did.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import yaml
from scipy.stats import qmc

from xray.config.pipeline import PipelineConfig
from xray.config.tuning import SearchChoice, TuningConfig
from xray.config_file import with_values
from xray.errors import ConfigError

logger = logging.getLogger(__name__)

OK, FAILED = "ok", "failed"


def sample(tuning: TuningConfig, seed: int) -> list[dict[str, Any]]:
    """``tuning.trials`` points of the space, the same for the same seed."""
    keys = sorted(tuning.space)
    if tuning.sampler == "sobol":
        with warnings.catch_warnings():  # "balance properties" of non-powers of two: fine for a handful of trials
            warnings.simplefilter("ignore", UserWarning)
            unit = qmc.Sobol(len(keys), scramble=True, seed=seed).random(tuning.trials)
    else:
        unit = np.random.default_rng(seed).random((tuning.trials, len(keys)))
    return [{key: _value(tuning.space[key], u) for key, u in zip(keys, row)} for row in unit]


def _value(dimension, u: float):
    if isinstance(dimension, SearchChoice):
        return dimension.choices[min(int(u * len(dimension.choices)), len(dimension.choices) - 1)]
    if dimension.log:
        value = math.exp(math.log(dimension.low) + u * (math.log(dimension.high) - math.log(dimension.low)))
    else:
        value = dimension.low + u * (dimension.high - dimension.low)
    return int(round(value)) if dimension.integer else float(value)


def trial_config(config: PipelineConfig, overrides: dict[str, Any], trial: bool = False) -> PipelineConfig:
    """The config with a point of the space applied and no search. ``trial``: as a trial trains, on the search's
    budget (``tuning.epochs`` and ``tuning.trial_values``); otherwise as the winner is trained."""
    values = dict(overrides)
    if trial:
        values |= dict(config.tuning.trial_values) | {"train.epochs": config.tuning.epochs}
    trial = with_values(config, values)
    return trial.model_copy(update={"tuning": None})


def run_trial(train: Callable[[], tuple[Any, dict, dict]]) -> dict[str, Any]:
    """Call ``train`` (returns model, history, throughput) and score it: the best val AUC of its epochs.

    Any error, and a loss that is not finite (divergence), make the trial ``failed`` with the reason.
    """
    try:
        _, history, throughput = train()
    except Exception as error:  # noqa: BLE001 - a trial's failure is recorded, never fatal to the search
        logger.warning("trial failed: %s", f"{type(error).__name__}: {error}".splitlines()[0])
        return {"status": FAILED, "error": f"{type(error).__name__}: {error}".splitlines()[0][:300], "val_auc": None}
    losses = np.asarray(history.get("loss", []), dtype=float)
    val_auc = np.asarray(history.get("val_auc", []), dtype=float)
    if not len(losses) or not np.isfinite(losses).all() or not np.isfinite(val_auc).any():
        return {"status": FAILED, "error": "diverged: the training loss is not finite", "val_auc": None}
    return {
        "status": OK,
        "error": "",
        "val_auc": float(np.nanmax(val_auc)),
        "best_epoch": int(np.nanargmax(val_auc)) + 1,
        "epochs_run": len(losses),
        "train_seconds": float(throughput.get("train_seconds", 0.0)),
    }


@dataclass
class Trial:
    """One trial of a search (a ZenML artifact): its values, its MLflow run, and how it ended (:func:`run_trial`)."""

    trial: int
    overrides: dict[str, Any]
    mlflow_run_id: str
    status: str
    error: str = ""
    val_auc: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    train_seconds: float | None = None


@dataclass
class Search:
    """The search's record (a ZenML artifact): every trial, and the winner."""

    trials: list[dict[str, Any]]
    winner: dict[str, Any]


def select(results: list[dict]) -> dict:
    """The trial with the highest val AUC (the lower trial number on a tie); failed trials never win."""
    usable = [r for r in results if r["status"] == OK and r["val_auc"] is not None and math.isfinite(r["val_auc"])]
    if not usable:
        reasons = "; ".join(f"trial {r['trial']}: {r['error']}" for r in results)
        raise ConfigError(f"every trial of the search failed ({reasons})")
    return max(usable, key=lambda r: (r["val_auc"], -r["trial"]))


def winner_yaml(config: PipelineConfig, winner: dict) -> str:
    """The config that reproduces the winner as a training run: its values, the full train.epochs, no search."""
    chosen = trial_config(config, winner["overrides"])
    header = (
        f"# Winner of the search: trial {winner['trial']}, val AUC {winner['val_auc']:.4f} after "
        f"{winner['epochs_run']} epoch(s). Train it with: python3 run.py --pipeline training --config <this file>\n"
    )
    return header + yaml.safe_dump(chosen.model_dump(mode="json", exclude={"tuning"}), sort_keys=False)
