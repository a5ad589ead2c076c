"""Binary detection metrics (scikit-learn), the same numbers for the arena and the trainer's validation.

A probability ≥ `threshold` (0.5, the subnet's rule) counts as "AI-generated". Ranking metrics (ROC-AUC, average
precision) are undefined when only one class is present; they are reported as None rather than a fake number.
"""

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

__all__ = ["METRIC_KEYS", "binary_metrics", "roc_points"]

METRIC_KEYS = ("n", "accuracy", "precision", "recall", "f1", "mcc", "auc", "ap")


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


def binary_metrics(
    labels: Sequence[int], probabilities: Sequence[float], threshold: float = 0.5
) -> dict[str, float | int | None]:
    """n, accuracy, precision, recall, F1, MCC at `threshold`; ROC-AUC and AP from the raw probabilities."""
    y, p = _check(labels, probabilities)
    result: dict[str, float | int | None] = {"n": int(len(y))}
    if not len(y):
        return {**result, **{key: None for key in METRIC_KEYS[1:]}}
    predicted = (p >= threshold).astype(np.int64)
    with warnings.catch_warnings():  # one class only: sklearn warns, MCC is 0 by definition
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        result["mcc"] = float(matthews_corrcoef(y, predicted))
    result.update(
        accuracy=float(accuracy_score(y, predicted)),
        precision=float(precision_score(y, predicted, zero_division=0)),
        recall=float(recall_score(y, predicted, zero_division=0)),
        f1=float(f1_score(y, predicted, zero_division=0)),
    )
    both = len(np.unique(y)) == 2
    result["auc"] = float(roc_auc_score(y, p)) if both else None
    result["ap"] = float(average_precision_score(y, p)) if both else None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}


def roc_points(labels: Sequence[int], probabilities: Sequence[float]) -> tuple[list[float], list[float]] | None:
    """(false positive rates, true positive rates) for a ROC plot; None with fewer than two classes."""
    y, p = _check(labels, probabilities)
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, p)
    return fpr.tolist(), tpr.tolist()
