"""Scoring the optional masks miners return: pixel IoU and F1 of the generated region, apart from the reward.

A pixel counts as generated when its value is above the subnet's 0.5 decision threshold (`is_generated`), on the
miner's mask and on the challenge's truth alike. When both mark no pixel (a real image answered with an empty
mask) the agreement is perfect: IoU and F1 are 1. A mask that is missing or refused by `bitmind.mask_codec`
(wrong size, undecodable, oversized, not 8-bit grayscale) scores as no mask: None, never an exception.
"""

from dataclasses import dataclass

import numpy as np

from bitmind.mask_codec import decode_mask
from bitmind.protocol import is_generated

__all__ = ["MaskScore", "mask_overlap", "score_mask"]


@dataclass(frozen=True)
class MaskScore:
    iou: float
    f1: float


def mask_overlap(predicted: np.ndarray, truth: np.ndarray) -> MaskScore:
    """IoU and F1 of the generated pixels of two maps of the same shape (values in [0, 1])."""
    if predicted.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} vs {truth.shape}")
    mine, real = is_generated(predicted), is_generated(truth)
    both = int(np.count_nonzero(mine & real))
    either = int(np.count_nonzero(mine | real))
    if either == 0:
        return MaskScore(1.0, 1.0)
    return MaskScore(both / either, 2 * both / (int(np.count_nonzero(mine)) + int(np.count_nonzero(real))))


def score_mask(payload: object, truth: np.ndarray) -> MaskScore | None:
    """A miner's mask payload (base64 PNG) against the challenge's truth mask; None when there is no usable mask."""
    predicted = decode_mask(payload, truth.shape)  # type: ignore[arg-type]
    return None if predicted is None else mask_overlap(predicted, truth)
