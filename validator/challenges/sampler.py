"""One challenge at a time: pick real or fake, draw from that source, augment.

The validator loop calls `ChallengeSampler.sample(rng)` and gets a `Challenge` (a 256² RGB image, its label and
metadata describing the source and the augmentation) or None when no real image is available yet. When a fake is
wanted but the generator has not cached anything, a real challenge is issued (with a warning) rather than waiting.
Real-only challenges make every miner's MCC 0, so a cache that stays empty raises an ERROR once per `empty_alarm_s`
that names the likely cause (the generator is not running).
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from validator.augment import Augmenter
from validator.challenges.synthetic import SyntheticImageSource

__all__ = ["EMPTY_ALARM_S", "Challenge", "ChallengeSampler", "ChallengeSource"]

log = logging.getLogger(__name__)

EMPTY_ALARM_S = 600.0  # an empty synthetic cache for this long is an outage, not a generator still warming up


class ChallengeSource(Protocol):
    def sample(self, rng: np.random.Generator) -> tuple[Image.Image, int, dict[str, Any]] | None: ...


@dataclass(frozen=True)
class Challenge:
    image: Image.Image  # augmented, size×size RGB
    label: int  # 0 real, 1 AI-generated
    metadata: dict[str, Any]  # source metadata + "augmentation": {"level", "ops"}


class ChallengeSampler:
    """Real with probability 1 - fake_probability, else synthetic (falling back to real while none is cached).

    `empty_alarm_s`: how long the synthetic cache may stay empty before the ERROR alarm, and its repeat interval.
    `clock`: seconds on a monotonic clock (tests drive it by hand).
    """

    def __init__(
        self,
        real: ChallengeSource,
        synthetic: SyntheticImageSource | None,
        augmenter: Augmenter | None = None,
        fake_probability: float = 0.5,
        empty_alarm_s: float = EMPTY_ALARM_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= fake_probability <= 1.0:
            raise ValueError(f"fake_probability must be in [0, 1], got {fake_probability}")
        if not empty_alarm_s > 0:
            raise ValueError(f"empty_alarm_s must be > 0, got {empty_alarm_s}")
        self.real = real
        self.synthetic = synthetic
        self.augmenter = augmenter or Augmenter()
        self.fake_probability = fake_probability
        self.empty_alarm_s = empty_alarm_s
        self._clock = clock
        self._empty_since: float | None = None  # clock time of the first fallback since a synthetic draw
        self._fallbacks = 0  # fake challenges sent as real ones since then
        self._next_alarm = 0.0

    def synthetic_cached(self) -> int | None:
        """Images in the synthetic cache now, or None without one (for the heartbeat)."""
        return None if self.synthetic is None else len(self.synthetic)

    def sample(self, rng: np.random.Generator) -> Challenge | None:
        """A fresh augmented challenge, or None (logged) when not even a real image is cached yet."""
        drawn = None
        if self.synthetic is not None and rng.random() < self.fake_probability:
            drawn = self.synthetic.sample(rng)
            if drawn is None:
                log.warning("no synthetic image cached yet: issuing a real challenge instead")
                self._note_fallback(self.synthetic.cache.root)
            else:
                self._empty_since, self._fallbacks = None, 0
        if drawn is None:
            drawn = self.real.sample(rng)
        if drawn is None:
            log.warning("no real image cached yet: no challenge this round")
            return None
        image, label, metadata = drawn
        augmented, augmentation = self.augmenter(image, rng)
        return Challenge(augmented, label, {**metadata, "label": label, "augmentation": augmentation})

    def _note_fallback(self, root: Path) -> None:
        """Count a fake challenge sent as a real one; ERROR once per `empty_alarm_s` while the cache stays empty."""
        now = self._clock()
        if self._empty_since is None:
            self._empty_since = now
            self._next_alarm = now + self.empty_alarm_s
        self._fallbacks += 1
        if now < self._next_alarm:
            return
        self._next_alarm = now + self.empty_alarm_s
        log.error(
            "synthetic cache %s empty for %.0f s: %d fake challenges were sent as real ones; is bitmind_generator "
            "running? (pm2 logs bitmind_generator; python -m bitmind.monitoring check "
            "~/.bitmind/generator/heartbeat.json)",
            root, now - self._empty_since, self._fallbacks,
        )
