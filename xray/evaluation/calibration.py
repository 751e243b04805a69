"""Calibration: probabilities that mean what they say, fitted on val only.

The classifier is trained with class weights and label smoothing, both of which move its sigmoid away from the
frequency a clinician would read into it. A calibration maps the head's logit ``z`` to
``sigmoid(z / temperature + bias)``:

- ``temperature`` (temperature scaling, Guo et al. 2017): one parameter, ranking unchanged;
- ``platt`` (Platt scaling): a temperature and a bias; the bias also undoes the prior that class weighting moved.

Both are fitted by maximum likelihood on val (scikit-learn's unpenalised logistic regression for Platt, scipy's
bounded scalar minimiser for the temperature). The fitted map is put inside the saved Keras model
(:func:`xray.model.network.calibrated_model`), so every path that runs the model reads calibrated probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar

METHODS = ("platt", "temperature", "none")
_EPS = 1e-12


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def logit(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Calibration:
    method: str
    temperature: float = 1.0
    bias: float = 0.0

    def probability(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(np.asarray(logits, dtype=np.float64) / self.temperature + self.bias)

    def as_dict(self) -> dict:
        return asdict(self)


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_calibration(y: np.ndarray, logits: np.ndarray, method: str = "platt") -> Calibration:
    """Maximum-likelihood calibration of ``logits`` against labels ``y`` (val only)."""
    y = np.asarray(y).astype(int)
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return Calibration("none")
    if len(np.unique(y)) < 2:
        raise ValueError("calibration needs both classes in val")
    if not np.all(np.isfinite(z)):
        raise ValueError("calibration needs finite logits")
    if method == "platt":
        from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn only where a calibration is fitted

        regression = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000).fit(z[:, None], y)
        slope, intercept = float(regression.coef_[0, 0]), float(regression.intercept_[0])
        if slope <= 0:
            # A non-positive slope would reverse or erase the ranking: val says the logit is no better than chance.
            raise ValueError(f"Platt scaling on val found slope {slope:.3g} <= 0: the model does not rank val")
        return Calibration("platt", temperature=1.0 / slope, bias=intercept)

    result = minimize_scalar(
        lambda log_t: _log_loss(y, sigmoid(z / np.exp(log_t))), bounds=(-6.0, 6.0), method="bounded"
    )
    return Calibration("temperature", temperature=float(np.exp(result.x)))


def parameter_covariance(calibration: Calibration, logits: np.ndarray) -> list[list[float]] | None:
    """How well the calibration's parameters are known: the asymptotic covariance of the maximum-likelihood fit, the
    inverse of the logistic likelihood's Fisher information at the fit, sum of p (1 - p) x x' over the images it was
    fitted on (x = (logit, 1) for Platt's slope 1 / temperature and bias, the logit alone for a temperature). It needs
    no label: at the fitted parameters the information depends on the logits alone. None for ``none``."""
    if calibration.method not in ("platt", "temperature"):
        return None
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    p = calibration.probability(z)
    x = np.stack([z, np.ones_like(z)], axis=1) if calibration.method == "platt" else z[:, None]
    information = (x * (p * (1 - p))[:, None]).T @ x
    return np.linalg.pinv(information).tolist()


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 15) -> float:
    """ECE of P(PNEUMONIA): over ``bins`` equal-width bins, the image-weighted mean |observed rate - mean probability|."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if len(y) == 0:
        return float("nan")
    if p.min() < 0 or p.max() > 1:
        raise ValueError("ECE needs probabilities in [0, 1]")
    index = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    gaps = np.abs(np.bincount(index, weights=y, minlength=bins) - np.bincount(index, weights=p, minlength=bins))
    return float(gaps.sum() / counts.sum())


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """Per non-empty equal-width bin: mean probability, observed rate and image count (the reliability diagram)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    index = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    keep = counts > 0
    return {
        "predicted": np.bincount(index, weights=p, minlength=bins)[keep] / counts[keep],
        "observed": np.bincount(index, weights=y, minlength=bins)[keep] / counts[keep],
        "count": counts[keep],
    }
