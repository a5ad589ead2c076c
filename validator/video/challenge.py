"""One video challenge: pick real or generated, draw a clip (20 % spliced from two videos), augment it as a whole.

A generated clip is wanted with `fake_probability`. Unlike images (whose fakes the packaged sample seeds), clips
are only issued while generated ones exist: with the generated-clip cache empty (the generator's video models are
opt-in) there is no video challenge (None: the caller sends an image challenge; warned at most once per
`warn_interval_s`), because a stream of real clips alone pays a miner that answers "real" to every clip. The same
holds while no real clip is cached. A video too short for a clip is skipped for another draw, at most `attempts` times.
"""

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from validator.challenges.mix import REAL, SYNTHETIC
from validator.video.augment import ClipAugmenter
from validator.video.sampling import ClipSampler, SampledClip

__all__ = ["ClipSource", "VideoChallenge", "VideoChallengeSampler"]

log = logging.getLogger(__name__)

Clip = tuple[np.ndarray, float]  # (frames (T, H, W, 3) uint8, fps)


class ClipSource(Protocol):
    def __len__(self) -> int: ...

    def sample(self, rng: np.random.Generator) -> tuple[Clip, int, dict[str, Any]] | None: ...


@dataclass(frozen=True)
class VideoChallenge:
    """A clip challenge; `kind` and `mask` read like an image `Challenge`'s, so the step scores both alike."""

    frames: np.ndarray  # augmented, (T, size, size, 3) uint8
    fps: float
    label: int  # 0 real, 1 AI-generated
    metadata: dict[str, Any]  # source metadata + "clip" (how frames were drawn) + "augmentation"
    mask: None = None  # clips carry no truth mask

    @property
    def kind(self) -> str:
        return SYNTHETIC if self.label == 1 else REAL


class VideoChallengeSampler:
    """Real with probability 1 - fake_probability, else generated; no clip at all while either class has no clip
    cached (the step sends an image instead): clips of one class only would pay a miner that gives one answer to
    every clip."""

    def __init__(
        self,
        real: ClipSource,
        synthetic: ClipSource | None,
        augmenter: ClipAugmenter,
        clips: ClipSampler = ClipSampler(),
        fake_probability: float = 0.5,
        attempts: int = 3,
        warn_interval_s: float = 600.0,
    ) -> None:
        if not 0.0 <= fake_probability <= 1.0:
            raise ValueError(f"fake_probability must be in [0, 1], got {fake_probability}")
        self.real = real
        self.synthetic = synthetic
        self.augmenter = augmenter
        self.clips = clips
        self.fake_probability = fake_probability
        self.attempts = max(1, attempts)
        self.warn_interval_s = warn_interval_s
        self._next_warning = 0.0

    def sample(self, rng: np.random.Generator) -> VideoChallenge | None:
        """A fresh augmented clip challenge, or None when no usable clip is cached."""
        if self.synthetic is None or not len(self.synthetic):
            self._warn_empty("no generated video clip cached: no video challenges until there is one (is a generator "
                             "making videos? --generator.video_share, --generator.video_models)")
            return None
        if not len(self.real):
            self._warn_empty("no real video clip cached: no video challenges until the filler caches one "
                             "(--validator.real_video_datasets, --validator.real_video_cache)")
            return None
        source = self.synthetic if rng.random() < self.fake_probability else self.real
        for _ in range(self.attempts):
            drawn = source.sample(rng)
            if drawn is None:
                log.warning("no video clip cached yet: no video challenge this round")
                return None
            challenge = self._build(rng, source, drawn)
            if challenge is not None:
                return challenge
        log.warning("no video long enough for a clip after %d draws", self.attempts)
        return None

    def _build(self, rng: np.random.Generator, source: ClipSource,
               drawn: tuple[Clip, int, dict[str, Any]]) -> VideoChallenge | None:
        (frames, fps), label, metadata = drawn
        sampled: SampledClip | None = None
        second_metadata = None
        if self.clips.wants_splice(rng):
            second = source.sample(rng)
            if second is not None:
                (frames_b, fps_b), _, second_metadata = second
                sampled = self.clips.splice(rng, (frames, fps), (frames_b, fps_b))
        if sampled is None:
            second_metadata = None
            sampled = self.clips.sample(rng, frames, fps)
        if sampled is None:
            return None
        augmented, augmentation = self.augmenter(sampled.frames, rng)
        extra = {"splice_source": _short(second_metadata)} if second_metadata is not None else {}
        return VideoChallenge(
            augmented, sampled.fps, label,
            {**metadata, **extra, "label": label, "modality": "video", "clip": sampled.info,
             "augmentation": augmentation},
        )

    def _warn_empty(self, message: str) -> None:
        """Once per `warn_interval_s`: a cache stays empty for a while, and the step runs every few seconds."""
        now = time.monotonic()
        if now >= self._next_warning:
            self._next_warning = now + self.warn_interval_s
            log.warning(message)


def _short(metadata: dict[str, Any]) -> dict[str, Any]:
    """Which item the second part of a splice came from."""
    return {key: metadata.get(key) for key in ("source", "file", "model", "cache_item") if key in metadata}
