"""Geometry of one inpainting job: the working size a model is called at, and pasting its region back.

Inpainting pipelines run at their model's resolution (512² for SD 1.x, 1024² for SDXL) and pass the whole image
through the VAE, which alters pixels outside the mask too. So a real image of any size (smaller than the model's,
too) is resized to a working size whose longer side is the model's and whose sides are multiples of 8, inpainted
there, and the result is resized back and blended into the original through the feathered mask: outside the
region the pixels stay the real ones, and the mask is exactly the share of each pixel that is generated.
"""

import numpy as np
from PIL import Image

from bitmind.image_codec import to_rgb
from bitmind.protocol import is_generated

__all__ = ["EmptyMaskError", "composite", "mask_area", "work_size"]

MULTIPLE = 8  # latent diffusion models downsample by 8


class EmptyMaskError(ValueError):
    """The mask marks no pixel as generated: inpainting it would give back the real image labelled as generated."""


def work_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) with the aspect of `size`, the longer side `side`, both multiples of 8 (at least 8)."""
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {size}")
    if side < MULTIPLE or side % MULTIPLE:
        raise ValueError(f"working side must be a multiple of {MULTIPLE} >= {MULTIPLE}, got {side}")
    scale = side / max(width, height)
    return tuple(max(MULTIPLE, int(round(s * scale / MULTIPLE)) * MULTIPLE) for s in (width, height))  # type: ignore[return-value]


def mask_area(mask: np.ndarray) -> float:
    """Share of the image the region covers (mean blend weight); EmptyMaskError when no pixel is generated."""
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim != 2 or not np.isfinite(mask).all() or mask.min(initial=0) < 0 or mask.max(initial=0) > 1:
        raise ValueError(f"a mask is a finite [H, W] map in [0, 1], got shape {mask.shape}")
    if not is_generated(mask).any():
        raise EmptyMaskError("the mask marks no pixel as generated")
    return float(mask.mean())


def composite(real: Image.Image, generated: Image.Image, mask: np.ndarray) -> Image.Image:
    """`generated` (any size) resized to `real`'s size and blended into it with weight `mask` ([H, W] in [0, 1])."""
    real = to_rgb(real)
    if np.shape(mask) != (real.height, real.width):
        raise ValueError(f"mask of shape {np.shape(mask)} does not fit a {real.width}x{real.height} image")
    generated = to_rgb(generated).resize(real.size, Image.Resampling.LANCZOS)
    weight = np.asarray(mask, dtype=np.float32)[..., None]
    blended = np.asarray(real, dtype=np.float32) * (1.0 - weight) + np.asarray(generated, dtype=np.float32) * weight
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
