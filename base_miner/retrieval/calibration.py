"""The match rule and the probability a match answers, fitted on held-out data and stored with the index.

A challenge matches when (1) its CNN match score reaches `shortlist`, so its best indexed image is verified, and
(2) at least `min_inliers` keypoints of the two agree on one transform. Positives are validator-style challenges
made from indexed images (each augmentation level); negatives are images that are NOT in the index (the datasets'
generated rows, or `--negatives`).

- `shortlist`: the score that SHORTLIST_SHARE of the negatives reach. It bounds the verification work on images
  that are not indexed; copies score far higher.
- inliers needed: INLIER_MARGIN times the most inliers reached by any shortlisted negative that scored at least the
  challenge's score minus SCORE_SLACK, and at least MIN_INLIERS (`min_inliers`). A false "real" on a generated
  challenge costs MCC, so the rule keeps a wide gap to everything seen near the challenge's score; the negatives
  with many chance keypoint agreements score low (a generated portrait against an aligned real face), so a copy
  that the CNN already ranks far above them needs fewer (`steps`: the score bands and their counts).

Per collection: an index of several datasets keeps one rule per indexed dataset (`collections`), fitted on the
negatives whose best indexed image lies in that dataset; a dataset that too few negatives land on uses the rule
fitted on all of them. Why: collections differ. Aligned faces all look alike to the CNN, so a true face copy stands
less far above its runners-up than a copy of a photo does, and a shortlist fitted on all negatives drops many; on
32² thumbnails up-scaled to 256², ORB finds spurious agreements on smooth content, so a generated thumbnail reaches
more inliers than any generated photo, and a global `min_inliers` fitted on them rejects true face matches.
An inlier count that falls with the score (rather than one count: the most any shortlisted negative reached)
then took level-1 recall on faces from 0.89 to 0.92 and on photos from 0.93 to 0.97 with a 96² descriptor, no
generated image matching that did not before (`benchmarks/retrieval.py`, README).
With these rules, ORB's FAST threshold 4 and the check that the transform is one a validator makes (`local.py`),
`benchmarks/retrieval.py` on 490 indexed images (photos, CIFAKE thumbnails, faces) went from 0.80 to 0.87 level-1
recall on faces and from 0.55 to 0.80 on thumbnails, photos unchanged at 0.94, with 3 false matches in 4,066
generated images (0.074 %; 0 before). Challenge keypoints at two scales, INLIER_MARGIN 2.0 and the check that the
challenge lies inside the image it matches (`local.py`) then gave 0.90 / 0.90 / 0.95 with 2 false matches (0.049 %).

The answered probability is P(AI-generated | match) under the validators' even real/fake mix, with add-one estimates
of the false-match rate and the recall, so a small calibration set gives a cautious (higher) value.
"""

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

__all__ = ["Calibration", "CalibrationError", "fit_calibration", "fit_shortlists"]

SHORTLIST_SHARE = 0.2
MIN_INLIERS = 15
INLIER_MARGIN = 2.0  # with two-scale challenge keypoints, 1.5 let look-alike portraits through (see the docstring)
SCORE_SLACK = 0.1  # a negative's keypoint count binds challenges scoring up to this much above it
MIN_NEGATIVES = 20  # negatives needed to fit a rule: for the whole index, and for a collection of its own


class CalibrationError(ValueError):
    """Too few or unusable held-out scores to fit the match rule."""


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


@dataclass(frozen=True)
class Calibration:
    shortlist: float  # CNN match score from which a challenge's best indexed image is verified
    min_inliers: int  # keypoints agreeing on one transform that make a verified image a match, at least
    # Stricter counts below a score: ([score, inliers], ...): a challenge scoring at most `score` needs `inliers`.
    steps: tuple[tuple[float, int], ...]
    probability: float  # P(AI-generated) answered for a match
    recall: dict[str, float]  # share of positives matched (to the right image), per augmentation level and "all"
    positives: int
    negatives: int
    false_matches: int  # negatives that match (0 by construction on the fitting set)
    # Rules of single indexed datasets: {first, images (the image numbers it covers), shortlist, min_inliers, steps,
    # negatives (that landed on it)}; images outside them use the rule above.
    collections: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps"] = [list(step) for step in self.steps]
        data["collections"] = [{**rule, "steps": [list(step) for step in rule["steps"]]} for rule in self.collections]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "Calibration":
        """Rebuild from a manifest; CalibrationError names the bad field."""
        if not isinstance(data, dict):
            raise CalibrationError(f"calibration must be a mapping, got {type(data).__name__}")
        rules = data.get("collections", [])
        if not isinstance(rules, list):
            raise CalibrationError(f"calibration collections must be a list, got {rules!r}")
        rules = [_with_steps(rule) for rule in rules]
        try:
            calibration = cls(**{**_with_steps(data), "collections": tuple(rules)})
        except TypeError as exc:
            raise CalibrationError(f"calibration fields: {exc}") from None
        for name in ("shortlist", "probability"):
            value = getattr(calibration, name)
            if not _is_number(value):
                raise CalibrationError(f"calibration {name} must be a finite number, got {value!r}")
        if not 0.0 <= calibration.probability <= 1.0:
            raise CalibrationError(f"calibration probability must be in [0, 1], got {calibration.probability!r}")
        if isinstance(calibration.min_inliers, bool) or not isinstance(calibration.min_inliers, int):
            raise CalibrationError(f"calibration min_inliers must be an integer, got {calibration.min_inliers!r}")
        end = 0
        for rule in rules:
            fields = ("first", "images", "shortlist", "min_inliers", "steps", "negatives")
            counts = ("first", "images", "min_inliers", "negatives")
            if (not isinstance(rule, dict) or set(rule) != set(fields) or not _is_number(rule["shortlist"])
                    or not all(_is_count(rule[key]) for key in counts) or rule["first"] < end):
                raise CalibrationError(f"calibration collection rule {rule!r} must hold {list(fields)}, in image order")
            end = rule["first"] + rule["images"]
        return calibration

    def _rule(self, image: int) -> tuple[float, int, tuple[tuple[float, int], ...]]:
        for rule in self.collections:
            if rule["first"] <= image < rule["first"] + rule["images"]:
                return rule["shortlist"], rule["min_inliers"], rule["steps"]
        return self.shortlist, self.min_inliers, self.steps

    def shortlists(self, images: np.ndarray) -> np.ndarray:
        """The shortlist that applies to each of these best indexed images."""
        return np.array([self._rule(int(image))[0] for image in images], dtype=np.float64)

    def inliers_needed(self, score: float, image: int) -> int:
        """Keypoints that must agree for a challenge scoring `score` against its best indexed image `image`."""
        _, min_inliers, steps = self._rule(int(image))
        return max([min_inliers] + [needed for upto, needed in steps if score <= upto])

    def describe(self) -> str:
        """The whole index's rule in a few words, for logs and reports."""
        most = max([self.min_inliers] + [needed for _, needed in self.steps])  # the count at the shortlist
        counts = (f"{self.min_inliers} inliers" if most == self.min_inliers
                  else f"{self.min_inliers}-{most} inliers (fewer at higher scores)")  # fmt: skip
        return f"score >= {self.shortlist:.3f} and {counts}, {len(self.collections)} datasets with a rule of their own"

    def matches(self, score: float, inliers: int, image: int) -> bool:
        """Whether a challenge whose best indexed image is `image` matches it."""
        return score >= self._rule(int(image))[0] and inliers >= self.inliers_needed(score, image)


def _shortlist(scores: np.ndarray) -> float:
    return float(np.quantile(scores, 1.0 - SHORTLIST_SHARE))


def _with_steps(rule: Any) -> Any:
    """A stored rule with its steps as a tuple of (score, inliers); CalibrationError for steps of another shape (a
    rule without steps is left to the field checks)."""
    if not isinstance(rule, dict) or "steps" not in rule:
        return rule
    raw = rule["steps"]
    if not isinstance(raw, list) or not all(isinstance(step, list) and len(step) == 2 and _is_number(step[0])
                                            and _is_count(step[1]) for step in raw):  # fmt: skip
        raise CalibrationError(f"calibration steps must be a list of [score, inliers] pairs, got {raw!r}")
    return {**rule, "steps": tuple((float(score), int(needed)) for score, needed in raw)}


def _inlier_rule(scores: np.ndarray, inliers: np.ndarray) -> dict[str, Any]:
    """min_inliers and steps from the shortlisted negatives' scores and inliers: each negative binds the challenges
    scoring up to SCORE_SLACK above it; only those that raise the count for lower scores are kept."""
    steps, most = [], 0
    for order in np.argsort(-scores, kind="stable"):
        if inliers[order] > most:
            most = int(inliers[order])
            needed = math.ceil(INLIER_MARGIN * most)
            if needed > MIN_INLIERS:
                steps.append((float(scores[order]) + SCORE_SLACK, needed))
    return {"min_inliers": MIN_INLIERS, "steps": tuple(steps)}


def fit_shortlists(negative_scores: np.ndarray, negative_best: np.ndarray,
                   collections: list[tuple[int, int]]) -> Calibration:  # fmt: skip
    """The shortlists alone (from the negatives' scores and best images; `collections` are (first image, images) of
    each indexed dataset), as a rule that verifies everything shortlisted: min_inliers are fitted afterwards by
    `fit_calibration` on the negatives this shortlists. CalibrationError with too few negatives."""
    scores = np.asarray(negative_scores, dtype=np.float64)
    best = np.asarray(negative_best)
    if scores.size < MIN_NEGATIVES or not np.isfinite(scores).all():
        raise CalibrationError(
            f"need at least {MIN_NEGATIVES} negatives (images not in the index, e.g. generated ones) to fit the match "
            f"rule, got {scores.size}"
        )
    rules = []
    for first, images in collections if len(collections) > 1 else ():
        landed = (best >= first) & (best < first + images)
        if landed.sum() >= MIN_NEGATIVES:
            rules.append({"first": int(first), "images": int(images), "shortlist": _shortlist(scores[landed]),
                          "min_inliers": 0, "steps": (), "negatives": int(landed.sum())})  # fmt: skip
    return Calibration(_shortlist(scores), 0, (), 1.0, {}, 0, int(scores.size), 0, tuple(rules))


def fit_calibration(
    shortlists: Calibration,
    positives: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    negatives: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> Calibration:
    """The whole match rule: `shortlists` (from `fit_shortlists`) plus the inlier counts fitted on the negatives'
    (score, inliers with their best image, best image), computed wherever a shortlist is reached; recall from the
    positives' (score, inliers with the RIGHT image else 0, right image) per augmentation level."""
    neg_scores, neg_inliers, neg_best = (np.asarray(a) for a in negatives)
    reached = neg_scores >= shortlists.shortlists(neg_best)
    rules = []
    for rule in shortlists.collections:
        landed = reached & (neg_best >= rule["first"]) & (neg_best < rule["first"] + rule["images"])
        rules.append(rule | _inlier_rule(neg_scores[landed], neg_inliers[landed]))
    overall = neg_scores >= shortlists.shortlist
    whole_index = _inlier_rule(neg_scores[overall], neg_inliers[overall])
    calibration = replace(shortlists, **whole_index, collections=tuple(rules))
    matched = {int(level): np.array([calibration.matches(s, i, b) for s, i, b in zip(*found)], dtype=bool)
               for level, found in positives.items()}  # fmt: skip
    every = np.concatenate(list(matched.values())) if matched else np.empty(0, bool)
    if every.size == 0:
        raise CalibrationError("need positives (challenges made from indexed images) to measure recall")
    false_matches = sum(calibration.matches(s, i, b) for s, i, b in zip(neg_scores, neg_inliers, neg_best))
    false_rate = (false_matches + 1) / (neg_scores.size + 2)
    recall_estimate = (int(every.sum()) + 1) / (every.size + 2)
    recall = {str(level): float(m.mean()) for level, m in sorted(matched.items())}
    recall["all"] = float(every.mean())
    return replace(calibration, probability=false_rate / (false_rate + recall_estimate), recall=recall,
                   positives=int(every.size), false_matches=int(false_matches))  # fmt: skip
