"""The challenge mix: which kind of image a challenge shows, and in what shares.

Three kinds: `real` (label 0), `synthetic` (a whole AI-generated image, label 1) and `semi-synthetic` (a real image
with a generated region, label 1 as well: for the binary reward any generated pixel makes the image generated).
Operators set the shares with `--challenge.probs REAL,SYNTHETIC,SEMI` (weights, normalised); without it they come
from `--validator.fake_prob`, a share SEMI_SHARE_OF_FAKES of the fakes being semi-synthetic.
"""

import math
from collections.abc import Mapping

__all__ = [
    "KINDS",
    "LABELS",
    "REAL",
    "SEMI_SHARE_OF_FAKES",
    "SEMI_SYNTHETIC",
    "SYNTHETIC",
    "check_kind_probs",
    "kind_probs_from_fake_prob",
    "parse_challenge_probs",
]

REAL, SYNTHETIC, SEMI_SYNTHETIC = "real", "synthetic", "semi-synthetic"
KINDS = (REAL, SYNTHETIC, SEMI_SYNTHETIC)
LABELS = {REAL: 0, SYNTHETIC: 1, SEMI_SYNTHETIC: 1}
# Default share of generated challenges that are semi-synthetic (whole-image fakes stay the majority).
SEMI_SHARE_OF_FAKES = 0.3


def parse_challenge_probs(text: str) -> dict[str, float]:
    """`"0.5,0.35,0.15"` -> {real, synthetic, semi-synthetic} shares summing to 1; ValueError saying what is wrong.

    Three non-negative finite numbers, in the order real, synthetic, semi-synthetic, with a positive sum.
    """
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) != len(KINDS):
        raise ValueError(f"expected three weights REAL,SYNTHETIC,SEMI_SYNTHETIC (e.g. 0.5,0.35,0.15), got {text!r}")
    weights = {}
    for kind, part in zip(KINDS, parts):
        try:
            weights[kind] = float(part)
        except ValueError:
            raise ValueError(f"weight of {kind} challenges is not a number: {part!r}") from None
    return check_kind_probs(weights)


def kind_probs_from_fake_prob(fake_prob: float, semi_share: float = SEMI_SHARE_OF_FAKES) -> dict[str, float]:
    """The mix `--validator.fake_prob` stands for when `--challenge.probs` is not given."""
    if not 0.0 <= fake_prob <= 1.0:
        raise ValueError(f"fake probability must be in [0, 1], got {fake_prob}")
    if not 0.0 <= semi_share <= 1.0:
        raise ValueError(f"semi-synthetic share of fakes must be in [0, 1], got {semi_share}")
    return {REAL: 1.0 - fake_prob, SYNTHETIC: fake_prob * (1.0 - semi_share), SEMI_SYNTHETIC: fake_prob * semi_share}


def check_kind_probs(probs: Mapping[str, float]) -> dict[str, float]:
    """Shares of the three kinds, normalised to sum 1; ValueError for unknown kinds, negative or all-zero weights."""
    unknown = set(probs) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown challenge kinds {sorted(unknown)}; kinds are {KINDS}")
    weights = {kind: float(probs.get(kind, 0.0)) for kind in KINDS}
    if any(not math.isfinite(weight) or weight < 0 for weight in weights.values()):
        raise ValueError(f"challenge weights must be finite and >= 0, got {weights}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("challenge weights must sum to more than 0")
    return {kind: weight / total for kind, weight in weights.items()}
