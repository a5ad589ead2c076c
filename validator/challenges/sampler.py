"""One challenge at a time: pick a kind (real, synthetic, semi-synthetic), draw from that source, augment.

The validator loop calls `ChallengeSampler.sample(rng)` and gets a `Challenge` (a 256² RGB image, its label and
metadata describing the source and the augmentation) or None while no real image is cached, whatever kind the draw
would have been: challenges of one class would pay a miner that answers "generated" to everything. When a fake is
wanted but the generator has not cached anything, a real challenge is issued (with a warning) rather than waiting.
Real-only challenges make every miner's MCC 0, so a cache that stays empty raises an ERROR once per `empty_alarm_s`
that names the likely cause (the generator is not running). A semi-synthetic challenge whose cache is empty (or not
configured) is issued from the other generated source first, so the share of generated challenges holds.

Every challenge carries its truth mask at challenge size (the generated pixels: none for a real image, all for a
synthetic one, the inpainted region for a semi-synthetic one, moved by the same augmentation as the image), against
which validators score the optional masks miners return.
"""

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from validator.augment import Augmenter
from validator.challenges.mix import REAL, SEMI_SYNTHETIC, SYNTHETIC, check_kind_probs, kind_probs_from_fake_prob
from validator.challenges.synthetic import SyntheticImageSource

__all__ = ["EMPTY_ALARM_S", "Challenge", "ChallengeSampler", "ChallengeSource"]

log = logging.getLogger(__name__)

EMPTY_ALARM_S = 600.0  # an empty synthetic cache for this long is an outage, not a generator still warming up


class ChallengeSource(Protocol):
    def __len__(self) -> int: ...  # images cached now; 0 = nothing to draw

    def sample(self, rng: np.random.Generator) -> tuple[Image.Image, int, dict[str, Any]] | None: ...


@dataclass(frozen=True)
class Challenge:
    image: Image.Image  # augmented, size×size RGB
    label: int  # 0 real, 1 AI-generated
    metadata: dict[str, Any]  # source metadata + "augmentation": {"level", "ops"}
    kind: str = REAL  # real, synthetic or semi-synthetic (validator.challenges.mix.KINDS)
    mask: np.ndarray | None = None  # truth: float32 [size, size] in [0, 1], the share of each pixel that is generated


class ChallengeSampler:
    """Real with probability 1 - fake_probability, else synthetic (falling back to real while none is cached).

    `kind_probs` (real / synthetic / semi-synthetic shares, see `validator.challenges.mix`) replaces
    `fake_probability` when given; without it, a share of the fakes is semi-synthetic. A generated kind without a
    source gives its share to the other generated kind, or to real when there is none.
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
        semi_synthetic: SyntheticImageSource | None = None,
        kind_probs: Mapping[str, float] | None = None,
    ) -> None:
        if not 0.0 <= fake_probability <= 1.0:
            raise ValueError(f"fake_probability must be in [0, 1], got {fake_probability}")
        if not empty_alarm_s > 0:
            raise ValueError(f"empty_alarm_s must be > 0, got {empty_alarm_s}")
        self.real = real
        self.synthetic = synthetic
        self.semi_synthetic = semi_synthetic
        self.augmenter = augmenter or Augmenter()
        self.kind_probs = self._effective_probs(
            kind_probs_from_fake_prob(fake_probability) if kind_probs is None else check_kind_probs(kind_probs)
        )
        self.fake_probability = 1.0 - self.kind_probs[REAL]
        self.empty_alarm_s = empty_alarm_s
        self._clock = clock
        self._empty_since: float | None = None  # clock time of the first fallback since a synthetic draw
        self._fallbacks = 0  # fake challenges sent as real ones since then
        self._next_alarm = 0.0
        self._semi_empty_told = False  # the empty semi-synthetic cache was reported (once, until it has items)

    def _effective_probs(self, probs: dict[str, float]) -> dict[str, float]:
        """Move the share of a generated kind without a source to the other generated kind (or to real)."""
        probs = dict(probs)
        sources = {SYNTHETIC: self.synthetic, SEMI_SYNTHETIC: self.semi_synthetic}
        for kind, other in ((SEMI_SYNTHETIC, SYNTHETIC), (SYNTHETIC, SEMI_SYNTHETIC)):
            if sources[kind] is None and probs[kind] > 0:
                heir = other if sources[other] is not None else REAL
                probs[heir] += probs[kind]
                probs[kind] = 0.0
        return probs

    def _choose_kind(self, rng: np.random.Generator) -> str:
        """One uniform draw (none without a generated source): synthetic, semi-synthetic, real."""
        if self.synthetic is None and self.semi_synthetic is None:
            return REAL
        draw = rng.random()
        if draw < self.kind_probs[SYNTHETIC]:
            return SYNTHETIC
        if draw < self.kind_probs[SYNTHETIC] + self.kind_probs[SEMI_SYNTHETIC]:
            return SEMI_SYNTHETIC
        return REAL

    def synthetic_cached(self) -> int | None:
        """Images in the synthetic cache now, or None without one (for the heartbeat)."""
        return None if self.synthetic is None else len(self.synthetic)

    def sample(self, rng: np.random.Generator) -> Challenge | None:
        """A fresh augmented challenge, or None (logged) while no real image is cached: generated challenges alone
        would pay a miner that answers "generated" to everything."""
        if not len(self.real):
            log.warning("no real image cached yet: no challenge this round")
            return None
        kind = self._choose_kind(rng)
        drawn, mask = None, None
        if kind == SEMI_SYNTHETIC:
            drawn = self.semi_synthetic.sample_with_mask(rng)
            if drawn is None:
                # Reported once: a generator without --generator.inpaint_share never fills this cache.
                log.log(
                    logging.DEBUG if self._semi_empty_told else logging.WARNING,
                    "semi-synthetic cache %s is empty: semi-synthetic challenges are sent as synthetic ones until "
                    "the generator fills it (--generator.inpaint_share)", self.semi_synthetic.cache.root,
                )
                self._semi_empty_told = True
                kind = SYNTHETIC if self.synthetic is not None else REAL
            else:
                self._semi_empty_told = False
                *drawn, mask = drawn
        if kind == SYNTHETIC:
            drawn = self.synthetic.sample(rng)
            if drawn is None:
                log.warning("no synthetic image cached yet: issuing a real challenge instead")
                self._note_fallback(self.synthetic.cache.root)
                kind = REAL
            else:
                self._empty_since, self._fallbacks = None, 0
        if kind == REAL:
            drawn = self.real.sample(rng)
        if drawn is None:
            log.warning("no real image cached yet: no challenge this round")
            return None
        image, label, metadata = drawn
        augmented, mask, augmentation = self.augmenter.augment_with_mask(image, mask, rng)
        if mask is None:  # a whole image: every pixel is generated, or none is
            mask = np.full((augmented.height, augmented.width), float(label), dtype=np.float32)
        metadata = {**metadata, "label": label, "kind": kind, "augmentation": augmentation}
        return Challenge(augmented, label, metadata, kind, mask)

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
