"""Semi-synthetic images without a diffusion model: a region of a generated image pasted into a real one.

The local demo (which has no inpainting pipeline) seeds its semi-synthetic cache this way, and miner training data
is made the same way: the donor (an AI-generated image) is fitted to the real image's size, its colours in the
region are matched to the real image's (per-channel mean, and spread within a factor of two: the region does not
stand out by tint alone, yet keeps its own texture even over a flat real area), and it is blended in through a feathered random region mask (`validator.region_mask`). The returned mask is
the blend weight: the share of each pixel that comes from the generated image.
"""

import numpy as np
from PIL import Image, ImageOps

from bitmind.image_codec import to_rgb
from validator.generation.inpainting import composite
from validator.region_mask import DEFAULT_AREA, random_region_mask

__all__ = ["make_semi_synthetic"]

MIN_STD = 1.0  # on the 0–255 scale: a flat donor keeps its own spread instead of being blown up
SPREAD_SCALE = (0.5, 2.0)  # bounds of the spread correction: the generated texture is never erased


def _match_colours(donor: np.ndarray, real: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Shift each donor channel to the real image's weighted mean in the region, and scale its spread towards the
    real one's (within SPREAD_SCALE)."""
    total = float(weight.sum())
    if total <= 0:
        return donor
    w = weight[..., None] / total
    donor_mean, real_mean = (donor * w).sum((0, 1)), (real * w).sum((0, 1))
    donor_std = np.sqrt(((donor - donor_mean) ** 2 * w).sum((0, 1)))
    real_std = np.sqrt(((real - real_mean) ** 2 * w).sum((0, 1)))
    scale = np.where(donor_std > MIN_STD, np.clip(real_std / np.maximum(donor_std, MIN_STD), *SPREAD_SCALE), 1.0)
    return np.clip((donor - donor_mean) * scale + real_mean, 0.0, 255.0)


def make_semi_synthetic(
    real: Image.Image,
    donor: Image.Image,
    rng: np.random.Generator,
    area: tuple[float, float] = DEFAULT_AREA,
) -> tuple[Image.Image, np.ndarray]:
    """(RGB image the size of `real`, float32 [H, W] mask in [0, 1] of generated pixels).

    `donor` is any AI-generated image (centre-cropped and resized to `real`'s size); `area` is the range of the
    region's share of the image. All randomness comes from `rng`.
    """
    if not isinstance(real, Image.Image) or not isinstance(donor, Image.Image):
        raise TypeError(f"real and donor must be PIL images, got {type(real).__name__}, {type(donor).__name__}")
    real = to_rgb(real)
    donor = ImageOps.fit(to_rgb(donor), real.size, method=Image.Resampling.LANCZOS)
    mask = random_region_mask(real.size, rng, area)
    donor_px = _match_colours(np.asarray(donor, dtype=np.float32), np.asarray(real, dtype=np.float32), mask)
    return composite(real, Image.fromarray(np.rint(donor_px).astype(np.uint8)), mask), mask
