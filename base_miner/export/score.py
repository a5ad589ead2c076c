"""Subnet 34's benchmark score (gasbench "sn34_score"), so offline numbers read like the live ones.

Per pass: `sqrt(max(1e-12, clip((MCC + 1) / 2, 0, 1) ** 1.2 * max(0, (0.25 - Brier) / 0.25) ** 1.8))`, on
P(synthetic); an image counts as synthetic when P(synthetic) > 0.5 (strictly). A second pass scores degraded
copies (`bench.degrade`) and the final score is `0.8 · base + 0.2 · degraded`. Brier weighs as much as MCC: a
detector answering 0.5 everywhere scores the floor (1e-6), and so does any detector whose Brier is ≥ 0.25.
MCC and Brier come from the project's one metrics module (`base_miner.arena.metrics`).
"""

import math
from collections.abc import Sequence


from base_miner.arena.metrics import binary_metrics

__all__ = ["AUG_WEIGHT", "BRIER_BASELINE", "blend", "sn34_from", "sn34_score"]

AUG_WEIGHT = 0.2  # share of the degraded pass in the final score
BRIER_BASELINE = 0.25  # Brier of answering 0.5 for every image
_FLOOR = 1e-12  # under the square root: the lowest score is 1e-6


def sn34_from(mcc: float, brier: float) -> float:
    """The score of one pass from its MCC (at P > 0.5) and its Brier score on P(synthetic)."""
    if not (math.isfinite(mcc) and math.isfinite(brier)):
        raise ValueError(f"MCC and Brier must be finite, got {mcc!r} and {brier!r}")
    mcc_part = min(1.0, max(0.0, (mcc + 1.0) / 2.0)) ** 1.2
    brier_part = max(0.0, (BRIER_BASELINE - brier) / BRIER_BASELINE) ** 1.8
    return math.sqrt(max(_FLOOR, mcc_part * brier_part))


def sn34_score(labels: Sequence[int], probabilities: Sequence[float]) -> float | None:
    """The score of one pass over labelled predictions (1 = synthetic); None when there are none."""
    metrics = binary_metrics(labels, probabilities)
    if not metrics["n"]:
        return None
    return sn34_from(float(metrics["mcc"]), float(metrics["brier"]))


def blend(base: float | None, degraded: float | None, weight: float = AUG_WEIGHT) -> float | None:
    """The final score: the base pass blended with the degraded pass (the base alone when that did not run)."""
    if base is None:
        return None
    if degraded is None:
        return base
    return (1.0 - weight) * base + weight * degraded
