"""Synthetic (AI-generated) challenge images: read from the cache the generator process writes.

The generator (`neurons/generator.py`) calls `ImageCache(cache_dir, max_bytes=...).put(image, metadata)` with
metadata such as `{"prompt", "model", "call_args", "seed", "source", ...}`; this side only reads. An empty cache
gives None: the validator then issues a real challenge instead of waiting for generation.
"""

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from validator.challenges.cache import ImageCache

__all__ = ["SyntheticImageSource"]


class SyntheticImageSource:
    """Uniform samples from the generator's cache, labelled 1 (AI-generated)."""

    LABEL = 1

    def __init__(self, cache: str | Path | ImageCache) -> None:
        self.cache = cache if isinstance(cache, ImageCache) else ImageCache(cache)

    def __len__(self) -> int:
        return len(self.cache)

    def sample(self, rng: np.random.Generator) -> tuple[Image.Image, int, dict[str, Any]] | None:
        """(RGB image, label 1, generator metadata + `source_type`), or None while the cache is empty."""
        drawn = self.cache.sample(rng)
        if drawn is None:
            return None
        image, metadata = drawn
        return image, self.LABEL, {"source_type": "synthetic", **metadata}
