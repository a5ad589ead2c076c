"""The match rule and the probability a match answers, fitted on held-out data and stored with the index.

A challenge matches when (1) its CNN match score reaches `shortlist`, so its best indexed image is verified, and
(2) at least `min_inliers` keypoints of the two agree on one transform. Positives are validator-style challenges
made from indexed images (each augmentation level); negatives are images that are NOT in the index (the datasets'
generated rows, or `--negatives`).

- `shortlist`: the score that SHORTLIST_SHARE of the negatives reach. It bounds the verification work on images
  that are not indexed; copies score far higher.
- `min_inliers`: INLIER_MARGIN times the most inliers any shortlisted negative reached, and at least MIN_INLIERS.
  A false "real" on a generated challenge costs MCC, so the rule keeps a wide gap to everything seen.

The answered probability is P(AI-generated | match) under the validators' even real/fake mix, with add-one estimates
of the false-match rate and the recall, so a small calibration set gives a cautious (higher) value.
"""

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Calibration", "CalibrationError", "fit_calibration", "shortlist_threshold"]

SHORTLIST_SHARE = 0.1
MIN_INLIERS = 15
INLIER_MARGIN = 1.5
MIN_NEGATIVES = 20


class CalibrationError(ValueError):
    """Too few or unusable held-out scores to fit the match rule."""


@dataclass(frozen=True)
class Calibration:
    shortlist: float  # CNN match score from which a challenge's best indexed image is verified
    min_inliers: int  # keypoints agreeing on one transform that make a verified image a match
    probability: float  # P(AI-generated) answered for a match
    recall: dict[str, float]  # share of positives matched (to the right image), per augmentation level and "all"
    positives: int
    negatives: int
    false_matches: int  # negatives that match (0 by construction on the fitting set)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Calibration":
        """Rebuild from a manifest; CalibrationError names the bad field."""
        if not isinstance(data, dict):
            raise CalibrationError(f"calibration must be a mapping, got {type(data).__name__}")
        try:
            calibration = cls(**data)
        except TypeError as exc:
            raise CalibrationError(f"calibration fields: {exc}") from None
        for name in ("shortlist", "probability"):
            value = getattr(calibration, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CalibrationError(f"calibration {name} must be a finite number, got {value!r}")
        if not 0.0 <= calibration.probability <= 1.0:
            raise CalibrationError(f"calibration probability must be in [0, 1], got {calibration.probability!r}")
        if isinstance(calibration.min_inliers, bool) or not isinstance(calibration.min_inliers, int):
            raise CalibrationError(f"calibration min_inliers must be an integer, got {calibration.min_inliers!r}")
        return calibration

    def matches(self, score: float, inliers: int) -> bool:
        return score >= self.shortlist and inliers >= self.min_inliers


def shortlist_threshold(negative_scores: np.ndarray) -> float:
    """The CNN score that SHORTLIST_SHARE of the negatives reach; CalibrationError with too few negatives."""
    scores = np.asarray(negative_scores, dtype=np.float64)
    if scores.size < MIN_NEGATIVES or not np.isfinite(scores).all():
        raise CalibrationError(
            f"need at least {MIN_NEGATIVES} negatives (images not in the index, e.g. generated ones) to fit the match "
            f"rule, got {scores.size}"
        )
    return float(np.quantile(scores, 1.0 - SHORTLIST_SHARE))


def fit_calibration(
    shortlist: float,
    positives: Mapping[int, tuple[np.ndarray, np.ndarray]],
    negatives: tuple[np.ndarray, np.ndarray],
) -> Calibration:
    """The match rule from (score, inliers) of positives per level (inliers with the RIGHT image, else 0) and of
    negatives (inliers with their best indexed image; only needed where score >= shortlist)."""
    neg_scores, neg_inliers = (np.asarray(a) for a in negatives)
    shortlisted = neg_inliers[neg_scores >= shortlist]
    min_inliers = max(MIN_INLIERS, math.ceil(INLIER_MARGIN * int(shortlisted.max(initial=0))))
    false_matches = int(((neg_scores >= shortlist) & (neg_inliers >= min_inliers)).sum())
    matched = {int(level): (np.asarray(s) >= shortlist) & (np.asarray(i) >= min_inliers)
               for level, (s, i) in positives.items()}  # fmt: skip
    every = np.concatenate(list(matched.values())) if matched else np.empty(0, bool)
    if every.size == 0:
        raise CalibrationError("need positives (challenges made from indexed images) to measure recall")
    false_rate = (false_matches + 1) / (neg_scores.size + 2)
    recall_estimate = (int(every.sum()) + 1) / (every.size + 2)
    recall = {str(level): float(m.mean()) for level, m in sorted(matched.items())}
    recall["all"] = float(every.mean())
    return Calibration(
        shortlist=float(shortlist),
        min_inliers=int(min_inliers),
        probability=false_rate / (false_rate + recall_estimate),
        recall=recall,
        positives=int(every.size),
        negatives=int(neg_scores.size),
        false_matches=false_matches,
    )
