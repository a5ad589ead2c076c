"""Random regions to regenerate or replace: one blob, ellipse or rectangle covering a drawn share of the image.

Semi-synthetic challenges (inpainting in the generator, spliced seed items in the local demo, miner training data)
all mark their generated region with a mask from here, so the three see the same kinds of regions: a shape of
area drawn uniformly from `area` (5–50 % by default), its edge feathered with a Gaussian blur so the seam is soft,
as inpainting pipelines blend it. Ellipses and rectangles are sized to hit the area exactly and placed fully inside
the image; a blob is a smooth random field thresholded at the quantile that gives the area.
"""

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["DEFAULT_AREA", "SHAPES", "random_region_mask"]

SHAPES = ("blob", "ellipse", "rectangle")
DEFAULT_AREA = (0.05, 0.5)
# Feather radius as a share of the shorter side (a 256² image gets a 1.5–4 px soft edge).
FEATHER = (0.006, 0.016)
BLOB_GRID = (3, 7)  # the smooth field is bicubic-upsampled from a grid this coarse: few, large blobs


def _ellipse(width: int, height: int, area: float, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Bounding box of an axis-aligned ellipse of `area` pixels that fits inside the image."""
    # pi * a * b = area with a <= width / 2, b <= height / 2.
    a_min = max(area / (math.pi * height / 2), 0.5)
    a = float(rng.uniform(a_min, max(a_min, width / 2)))
    b = min(area / (math.pi * a), height / 2)
    cx, cy = float(rng.uniform(a, width - a)), float(rng.uniform(b, height - b))
    return cx - a, cy - b, cx + a, cy + b


def _rectangle(width: int, height: int, area: float, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """An axis-aligned rectangle of `area` pixels inside the image."""
    w_min = max(area / height, 1.0)
    w = float(rng.uniform(w_min, max(w_min, width)))
    h = min(area / w, height)
    left, top = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
    return left, top, left + w, top + h


def _blob(width: int, height: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask: a smooth random field above its (1 - share) quantile."""
    grid = int(rng.integers(BLOB_GRID[0], BLOB_GRID[1] + 1))
    coarse = rng.random((grid, grid)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC))
    return field > np.quantile(field, 1.0 - share)


def random_region_mask(
    size: tuple[int, int],
    rng: np.random.Generator,
    area: tuple[float, float] = DEFAULT_AREA,
    shape: str | None = None,
) -> np.ndarray:
    """A float32 [height, width] mask in [0, 1] for an image of `size` = (width, height) (PIL order).

    `area`: the share of the image the region covers, drawn uniformly from this range (0 < low <= high <= 1).
    `shape`: one of SHAPES, or None to draw one. The region is never empty, however small the image.
    """
    width, height = (int(side) for side in size)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {size}")
    low, high = area
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"area range must satisfy 0 < low <= high <= 1, got {area}")
    if shape is None:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
    elif shape not in SHAPES:
        raise ValueError(f"unknown region shape {shape!r}; shapes are {SHAPES}")
    share = float(rng.uniform(low, high))
    if shape == "blob":
        hard = _blob(width, height, share, rng)
    else:
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        box = (_ellipse if shape == "ellipse" else _rectangle)(width, height, share * width * height, rng)
        (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=255)
        hard = np.asarray(canvas) > 127
    if not hard.any():  # a tiny image can round the region away
        hard[height // 2, width // 2] = True
    radius = float(rng.uniform(*FEATHER)) * min(width, height)
    soft = Image.fromarray(hard.astype(np.uint8) * 255, mode="L").filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(soft, dtype=np.float32) / 255.0
