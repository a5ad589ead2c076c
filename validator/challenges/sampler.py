"""One challenge at a time: pick real or fake, draw from that source, augment.

The validator loop calls `ChallengeSampler.sample(rng)` and gets a `Challenge` (a 256² RGB image, its label and
metadata describing the source and the augmentation) or None when no real image is available yet. When a fake is
wanted but the generator has not cached anything, a real challenge is issued (with a warning) rather than waiting.
"""

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from validator.augment import Augmenter

__all__ = ["Challenge", "ChallengeSampler", "ChallengeSource"]

log = logging.getLogger(__name__)


class ChallengeSource(Protocol):
    def sample(self, rng: np.random.Generator) -> tuple[Image.Image, int, dict[str, Any]] | None: ...


@dataclass(frozen=True)
class Challenge:
    image: Image.Image  # augmented, size×size RGB
    label: int  # 0 real, 1 AI-generated
    metadata: dict[str, Any]  # source metadata + "augmentation": {"level", "ops"}


class ChallengeSampler:
    """Real with probability 1 - fake_probability, else synthetic (falling back to real while none is cached)."""

    def __init__(
        self,
        real: ChallengeSource,
        synthetic: ChallengeSource | None,
        augmenter: Augmenter | None = None,
        fake_probability: float = 0.5,
    ) -> None:
        if not 0.0 <= fake_probability <= 1.0:
            raise ValueError(f"fake_probability must be in [0, 1], got {fake_probability}")
        self.real = real
        self.synthetic = synthetic
        self.augmenter = augmenter or Augmenter()
        self.fake_probability = fake_probability

    def sample(self, rng: np.random.Generator) -> Challenge | None:
        """A fresh augmented challenge, or None (logged) when not even a real image is cached yet."""
        drawn = None
        if self.synthetic is not None and rng.random() < self.fake_probability:
            drawn = self.synthetic.sample(rng)
            if drawn is None:
                log.warning("no synthetic image cached yet: issuing a real challenge instead")
        if drawn is None:
            drawn = self.real.sample(rng)
        if drawn is None:
            log.warning("no real image cached yet: no challenge this round")
            return None
        image, label, metadata = drawn
        augmented, augmentation = self.augmenter(image, rng)
        return Challenge(augmented, label, {**metadata, "label": label, "augmentation": augmentation})
