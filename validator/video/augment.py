"""Clip-consistent augmentation: the image augmenter's levels 0-3, with ONE set of parameters per clip.

Drawing crop, rotation, flips, colour, blur, noise and JPEG quality per frame would make a clip flicker and jump, a
temporal artifact no camera or generator produces, that a miner could learn instead of the generation traces. So
the level and a seed are drawn once per clip, and every frame goes through `validator.augment.Augmenter` with a
generator started from that seed: the same draws, hence the same parameters, for every frame. This includes level
3's noise field, which is therefore fixed over the clip, like a sensor's fixed-pattern noise.
"""

import time
from typing import Any

import numpy as np
from PIL import Image

from validator.augment import Augmenter

__all__ = ["ClipAugmenter"]


class ClipAugmenter:
    """Applies an `Augmenter` to every frame of a clip with the same parameters; `seconds` accumulates its time."""

    def __init__(self, augmenter: Augmenter) -> None:
        self.augmenter = augmenter
        self.seconds = 0.0

    @property
    def size(self) -> int:
        return self.augmenter.size

    def __call__(self, frames: np.ndarray, rng: np.random.Generator, level: int | None = None
                 ) -> tuple[np.ndarray, dict[str, Any]]:
        """(T, size, size, 3) uint8 frames and the description `{"level", "ops", "seed"}` shared by all frames."""
        started = time.perf_counter()
        try:
            frames = np.asarray(frames)
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
                raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.shape}")
            if level is None:
                level = self.augmenter.choose_level(rng)
            seed = int(rng.integers(2**63))
            out = np.empty((len(frames), self.size, self.size, 3), dtype=np.uint8)
            description: dict[str, Any] = {}
            for index, frame in enumerate(frames):
                image, description = self.augmenter(Image.fromarray(frame), np.random.default_rng(seed), level)
                out[index] = np.asarray(image)
            return out, {**description, "seed": seed}
        finally:
            self.seconds += time.perf_counter() - started
