"""Thumbnail layout (TALL): a clip's frames, sampled by time at a fixed count, tiled into one grid image.

Why: an image network then sees spatial artifacts inside each tile and temporal ones (flicker, identity drift)
across tiles in one forward pass, at the cost of one image. A fixed count sampled evenly over the clip makes a
2 s clip at 30 fps and a 4 s clip at 8 fps look alike in layout, so frame rate and length do not become the
label. Tiles are centre crops at native scale (`crop`), or the whole frame resized (`resize`).
"""

import math
from typing import Literal

import numpy as np
from PIL import Image

from base_miner.detectors.torch_detector import fit_image

__all__ = ["DEFAULT_FRAMES", "DEFAULT_TILE", "DEFAULT_TILE_MODE", "grid_side", "sample_indices", "thumbnail_grid"]

# The packaged TALL layout (base_miner/configs/tall.yaml); clip datasets are laid out with it for training.
DEFAULT_FRAMES = 4
DEFAULT_TILE = 128
DEFAULT_TILE_MODE = "crop"


def sample_indices(available: int, count: int) -> np.ndarray:
    """`count` frame indices spread evenly over `available` frames (centres of equal segments; repeats when the
    clip is shorter than `count`)."""
    if available < 1 or count < 1:
        raise ValueError(f"need at least one frame and a positive count, got {available} and {count}")
    return np.minimum(((np.arange(count) + 0.5) * available / count).astype(int), available - 1)


def grid_side(count: int) -> int:
    """Tiles per side of the square grid of `count` frames; the grid is square so no tile is cropped away by a
    square-input network, hence `count` must be a square number (4, 9, 16)."""
    side = math.isqrt(count) if count > 0 else 0
    if side < 1 or side * side != count:
        raise ValueError(f"the frame count of a thumbnail grid must be a square number (4, 9, 16), got {count}")
    return side


def thumbnail_grid(
    frames: np.ndarray,
    count: int = DEFAULT_FRAMES,
    tile: int = DEFAULT_TILE,
    mode: Literal["crop", "resize"] = DEFAULT_TILE_MODE,
) -> Image.Image:
    """The TALL image of a clip (T, H, W, 3) uint8: `count` frames as `tile`² tiles, row by row."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"a clip must be shaped (T>0, H, W, 3), got {frames.shape}")
    columns = grid_side(count)
    grid = Image.new("RGB", (columns * tile, columns * tile))
    for cell, index in enumerate(sample_indices(len(frames), count)):
        image = Image.fromarray(frames[index])
        image = fit_image(image, tile, "center_crop" if mode == "crop" else "short_side")
        grid.paste(image, ((cell % columns) * tile, (cell // columns) * tile))
    return grid
