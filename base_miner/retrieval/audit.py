"""Validator audit: what share of a real-image stream a public index recognises after each augmentation level.

A validator operator runs it on their own real sources with their own augmenter: a high share at a level means
miners holding a public index answer those challenges by look-up instead of detection; the remedies are a level mix
that favours the heavier levels (`--validator.augment_probs`) and real sources that are not public.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from base_miner.retrieval.builder import Challenge
from base_miner.retrieval.expert import RetrievalExpert

__all__ = ["audit"]


def audit(
    expert: RetrievalExpert,
    images: Iterable[Image.Image],
    challenge: Challenge,
    levels: Sequence[int],
    level_probs: Mapping[int, float] | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Push every image through `challenge` at each level and count the look-up matches.

    Returns `{"images", "recognised": {level: share}, "mix": share under level_probs (or None)}`.
    """
    matched = {level: 0 for level in levels}
    count = 0
    pending: list[tuple[int, Image.Image]] = []

    def flush() -> None:
        found = expert.lookup([image for _, image in pending])
        for (level, _), match in zip(pending, found):
            matched[level] += match is not None
        pending.clear()

    for image in tqdm(images, desc="audit", unit="img", leave=False):
        for level in levels:
            pending.append((level, challenge(image, np.random.default_rng([seed, count, level]), level)))
        count += 1
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    shares = {level: matched[level] / count if count else 0.0 for level in levels}
    mix = None
    if level_probs:
        total = sum(level_probs.values())
        mix = sum(shares.get(level, 0.0) * weight for level, weight in level_probs.items()) / total
    return {"images": count, "recognised": shares, "mix": mix}
