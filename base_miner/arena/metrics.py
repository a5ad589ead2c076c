"""Binary detection metrics (scikit-learn), the same numbers for the arena and the trainer's validation.

A probability strictly above 0.5 counts as "AI-generated" (`bitmind.protocol.is_generated`, the subnet's rule,
also used by the validator's reward). Ranking metrics (ROC-AUC, average
precision) are undefined when only one class is present; they are reported as None rather than a fake number.
Calibration metrics (Brier score, expected calibration error) are reported for every run: today's subnet scores
calibration as much as MCC, so a detector whose 0.9 is right half the time must show it.
"""

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from bitmind.json_safe import json_safe
from bitmind.protocol import is_generated

__all__ = ["ECE_BINS", "METRIC_KEYS", "binary_metrics", "expected_calibration_error", "roc_points"]

METRIC_KEYS = ("n", "accuracy", "precision", "recall", "f1", "mcc", "auc", "ap", "brier", "ece")
ECE_BINS = 10


def _check(labels: Sequence[int], probabilities: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (AI-generated)")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must be finite numbers in [0, 1]")
    return y, p


def binary_metrics(labels: Sequence[int], probabilities: Sequence[float]) -> dict[str, float | int | None]:
    """n, accuracy, precision, recall, F1, MCC at the subnet's rule; ROC-AUC, AP, Brier and ECE from the raw
    probabilities."""
    y, p = _check(labels, probabilities)
    result: dict[str, float | int | None] = {"n": int(len(y))}
    if not len(y):
        return {**result, **{key: None for key in METRIC_KEYS[1:]}}
    predicted = is_generated(p).astype(np.int64)
    with warnings.catch_warnings():  # one class only: sklearn warns, MCC is 0 by definition
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        result["mcc"] = float(matthews_corrcoef(y, predicted))
    result.update(
        accuracy=float(accuracy_score(y, predicted)),
        precision=float(precision_score(y, predicted, zero_division=0)),
        recall=float(recall_score(y, predicted, zero_division=0)),
        f1=float(f1_score(y, predicted, zero_division=0)),
    )
    result["brier"] = float(brier_score_loss(y, p, pos_label=1))
    result["ece"] = expected_calibration_error(y, p)
    both = len(np.unique(y)) == 2
    result["auc"] = float(roc_auc_score(y, p)) if both else None
    result["ap"] = float(average_precision_score(y, p)) if both else None
    return json_safe(result)


def expected_calibration_error(labels: Sequence[int], probabilities: Sequence[float], bins: int = ECE_BINS) -> float:
    """Mean |share of fakes - mean probability| over `bins` equal-width probability bins, weighted by bin size.

    Bins are (a, b] (the first [0, b]), as scikit-learn's `calibration_curve` makes them."""
    y, p = _check(labels, probabilities)
    if not len(y):
        raise ValueError("no predictions")
    index = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], p)
    counts = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, weights=y, minlength=bins) - np.bincount(index, weights=p, minlength=bins))
    return float(gap[counts > 0].sum() / len(y))


def roc_points(labels: Sequence[int], probabilities: Sequence[float]) -> tuple[list[float], list[float]] | None:
    """(false positive rates, true positive rates) for a ROC plot; None with fewer than two classes."""
    y, p = _check(labels, probabilities)
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, p)
    return fpr.tolist(), tpr.tolist()
