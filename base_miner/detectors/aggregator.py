"""StackedAggregator: CAMO's learned combination of expert outputs — a logistic regression over expert logits.

Why learned: `max` lets any one expert's false alarm decide (the face route then called 91 % of real face photos
fake), and hand-set weights encode nothing about how reliable each expert is where. A logistic regression over
the experts' logits, plus an indicator per optional expert saying whether it ran, learns how much to trust each one
and is calibrated by construction (it is Platt scaling of a weighted sum). It must be fitted on images none of the
experts trained on (`bitmind-fit-stack`), or it learns to trust their memorised answers.
"""

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from base_miner.registry import ConfigError
from bitmind.atomic import atomic_write_bytes

__all__ = ["AGGREGATOR_VERSION", "StackedAggregator", "clipped_logit"]

AGGREGATOR_VERSION = 1
_EPS = 1e-4  # probabilities are clipped to [eps, 1 - eps] before the logit: a certain expert stays finite


def clipped_logit(p: float, eps: float = _EPS) -> float:
    """The logit of `p` clipped to [eps, 1 - eps], so that an answer of exactly 0 or 1 stays finite."""
    p = min(1.0 - eps, max(eps, float(p)))
    return math.log(p / (1.0 - p))


def _names(always: Sequence[str], optional: Sequence[str]) -> list[str]:
    return [f"logit:{e}" for e in [*always, *optional]] + [f"ran:{e}" for e in optional]


def _features(always: Sequence[str], optional: Sequence[str], outputs: Mapping[str, float]) -> np.ndarray:
    """One image's feature vector; an expert that did not run contributes logit 0 and ran 0."""
    logits = [clipped_logit(outputs[e]) if e in outputs else 0.0 for e in [*always, *optional]]
    return np.asarray(logits + [1.0 if e in outputs else 0.0 for e in optional])


class StackedAggregator:
    """P(generated) = sigmoid(intercept + Σ coef · feature); features named `logit:<expert>` and `ran:<expert>`."""

    def __init__(self, always: Sequence[str], optional: Sequence[str], coef: Mapping[str, float], intercept: float,
                 meta: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.always, self.optional = list(always), list(optional)
        names = self.feature_names()
        if set(coef) != set(names):
            raise ConfigError(f"aggregator coefficients {sorted(coef)} do not match its features {names}")
        values = [float(coef[name]) for name in names] + [float(intercept)]
        if not all(math.isfinite(v) for v in values):
            raise ConfigError("aggregator has non-finite coefficients")
        self.coef = np.asarray(values[:-1])
        self.intercept = values[-1]
        self.meta = dict(meta or {})

    def feature_names(self) -> list[str]:
        return _names(self.always, self.optional)

    def features(self, outputs: Mapping[str, float]) -> np.ndarray:
        return _features(self.always, self.optional, outputs)

    def probability(self, outputs: Mapping[str, float]) -> float:
        missing = [e for e in self.always if e not in outputs]
        if missing:
            raise RuntimeError(f"aggregator needs the outputs of {missing}")
        z = float(self.features(outputs) @ self.coef + self.intercept)
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    @classmethod
    def fit(cls, always: Sequence[str], optional: Sequence[str], outputs: Sequence[Mapping[str, float]],
            labels: Sequence[int], weights: Sequence[float] | None = None, c: float = 1.0,
            meta: Mapping[str, Any] | None = None) -> "StackedAggregator":  # fmt: skip
        """Logistic regression (L2, inverse strength `c`) of the labels on the outputs' features."""
        from sklearn.linear_model import LogisticRegression

        x = np.stack([_features(always, optional, o) for o in outputs])
        y = np.asarray(labels)
        if len(np.unique(y)) < 2:
            raise ValueError("the aggregator needs real and AI-generated examples")
        model = LogisticRegression(C=c, max_iter=1000).fit(x, y, sample_weight=weights)
        coef = dict(zip(_names(always, optional), model.coef_.reshape(-1).tolist()))
        return cls(always, optional, coef, float(model.intercept_[0]), meta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": AGGREGATOR_VERSION, "always": self.always, "optional": self.optional,
            "coef": dict(zip(self.feature_names(), self.coef.tolist())), "intercept": self.intercept, "meta": self.meta,
        }  # fmt: skip

    def save(self, path: str | Path) -> Path:
        return atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2).encode())

    @classmethod
    def load(cls, path: str | Path) -> "StackedAggregator":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read CAMO aggregator {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != AGGREGATOR_VERSION:
            raise ConfigError(f"CAMO aggregator {str(path)!r} is not a version-{AGGREGATOR_VERSION} aggregator file")
        try:
            return cls(data["always"], data["optional"], data["coef"], data["intercept"], data.get("meta"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"CAMO aggregator {str(path)!r} is malformed: {exc}") from exc


