"""Synthetic (AI-generated) challenge images: read from the cache the generator process writes.

The generator (`neurons/generator.py`) calls `ImageCache(cache_dir, max_bytes=...).put(image, metadata)` with
metadata such as `{"prompt", "model", "call_args", "seed", "source", ...}`; this side only reads. An empty cache
gives None: the validator then issues a real challenge instead of waiting for generation.

Semi-synthetic items (real images with an inpainted region) live in a cache of their own, each with its mask of
generated pixels; the same class reads it with `kind="semi-synthetic"`.
"""

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from validator.challenges.cache import ImageCache
from validator.challenges.mix import LABELS, SEMI_SYNTHETIC, SYNTHETIC

__all__ = ["SyntheticImageSource"]


class SyntheticImageSource:
    """Uniform samples from the generator's cache, labelled 1 (AI-generated); `kind` is synthetic or semi-synthetic."""

    LABEL = 1

    def __init__(self, cache: str | Path | ImageCache, kind: str = SYNTHETIC) -> None:
        if kind not in (SYNTHETIC, SEMI_SYNTHETIC) or LABELS[kind] != self.LABEL:
            raise ValueError(f"a generated-image source is {SYNTHETIC} or {SEMI_SYNTHETIC}, got {kind!r}")
        self.cache = cache if isinstance(cache, ImageCache) else ImageCache(cache)
        self.kind = kind

    def __len__(self) -> int:
        return len(self.cache)

    def sample(self, rng: np.random.Generator) -> tuple[Image.Image, int, dict[str, Any]] | None:
        """(RGB image, label 1, generator metadata + `source_type`), or None while the cache is empty."""
        drawn = self.sample_with_mask(rng)
        return None if drawn is None else drawn[:3]

    def sample_with_mask(
        self, rng: np.random.Generator
    ) -> tuple[Image.Image, int, dict[str, Any], np.ndarray | None] | None:
        """As `sample`, plus the item's mask of generated pixels (None for a whole generated image)."""
        drawn = self.cache.sample_with_mask(rng)
        if drawn is None:
            return None
        image, metadata, mask = drawn
        return image, self.LABEL, {"source_type": self.kind, **metadata}, mask
