"""On-disk clip cache: a clip is stored as ONE image, its frames tiled row by row in a grid (a contact sheet).

Why not a video file: the image cache (`validator.challenges.cache.ImageCache`) already gives atomic items with JSON
sidecars, size caps with oldest-first eviction, cleanup of broken items and safety for concurrent readers and
writers; storing a clip as one image reuses all of it instead of a second cache with the same rules. A sheet is a
JPEG (quality 95 by default): a 32-frame 456x256 clip is ~1 MB and decodes in ~20 ms, so a challenge reads it within
the step's budget. The sidecar's metadata carries the grid under `clip` ({frames, fps, width, height, columns});
a sheet whose grid does not match its pixels is a broken item, skipped and removed with a warning.
"""

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bitmind.json_safe import json_safe
from validator.challenges.cache import ITEM_KEY, ITEM_MAX_PIXELS, ImageCache

__all__ = ["CLIP_KEY", "ClipCache", "tile_frames", "untile_frames"]

CLIP_KEY = "clip"
COLUMNS = 8
MAX_CLIP_FRAMES = 512


def tile_frames(frames: np.ndarray, columns: int = COLUMNS) -> Image.Image:
    """(T, H, W, 3) uint8 frames as one RGB image of `columns` frames per row (the last row padded black)."""
    count, height, width = frames.shape[:3]
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    sheet = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, frame in enumerate(frames):
        row, column = divmod(index, columns)
        sheet[row * height:(row + 1) * height, column * width:(column + 1) * width] = frame
    return Image.fromarray(sheet)


def _fit_sheet(frames: np.ndarray, columns: int) -> tuple[np.ndarray, list[int] | None]:
    """Frames shrunk (aspect kept) so their sheet stays within ITEM_MAX_PIXELS, the limit a cache reader applies,
    and ([width, height] before) when they had to be: long clips at high resolution (e.g. 61 frames at 1280²)
    would otherwise be stored and then deleted by the first reader. Challenges are far smaller than either."""
    count, height, width = frames.shape[:3]
    rows = math.ceil(count / columns)
    if rows * height * columns * width <= ITEM_MAX_PIXELS:
        return frames, None
    scale = math.sqrt(ITEM_MAX_PIXELS / (rows * height * columns * width))
    size = (max(2, math.floor(width * scale)), max(2, math.floor(height * scale)))
    shrunk = np.stack([np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BOX)) for frame in frames])
    return shrunk, [width, height]


def untile_frames(sheet: Image.Image, grid: Any) -> np.ndarray:
    """The frames of a sheet described by `grid` ({frames, width, height, columns}); ValueError when they disagree."""
    if not isinstance(grid, dict):
        raise ValueError("no clip grid in the metadata")
    try:
        count, width, height, columns = (int(grid[key]) for key in ("frames", "width", "height", "columns"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad clip grid {grid!r}") from exc
    if not (1 <= count <= MAX_CLIP_FRAMES and width >= 2 and height >= 2 and 1 <= columns <= count):
        raise ValueError(f"bad clip grid {grid!r}")
    rows = math.ceil(count / columns)
    if sheet.size != (columns * width, rows * height):
        raise ValueError(f"sheet of {sheet.size} does not hold {count} frames of {width}x{height} in {columns} columns")
    pixels = np.asarray(sheet)
    grid_view = pixels.reshape(rows, height, columns, width, 3).swapaxes(1, 2).reshape(rows * columns, height, width, 3)
    return np.ascontiguousarray(grid_view[:count])


class ClipCache:
    """A size-capped folder of clips (frames + fps + metadata) on top of an `ImageCache`."""

    def __init__(self, root: str | Path, max_bytes: int = 2 * 1024**3, max_items: int | None = None,
                 quality: int = 95) -> None:
        self.images = ImageCache(root, max_bytes=max_bytes, max_items=max_items)
        self.quality = quality

    @property
    def root(self) -> Path:
        return self.images.root

    def __repr__(self) -> str:
        return f"ClipCache({str(self.root)!r}, max_bytes={self.images.max_bytes}, max_items={self.images.max_items})"

    def __len__(self) -> int:
        return len(self.images)

    def total_bytes(self) -> int:
        return self.images.total_bytes()

    def is_full(self) -> bool:
        return self.images.is_full()

    def put(self, frames: np.ndarray, fps: float, metadata: dict[str, Any]) -> Path:
        """Store a clip; returns the sheet's path. ValueError for frames that are not (T, H, W, 3) uint8 with
        1..512 frames, a non-positive fps, or what `ImageCache.put` refuses."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be a (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
        if not 1 <= len(frames) <= MAX_CLIP_FRAMES:
            raise ValueError(f"a clip holds 1..{MAX_CLIP_FRAMES} frames, got {len(frames)}")
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be positive, got {fps}")
        columns = min(COLUMNS, len(frames))
        frames, scaled_from = _fit_sheet(frames, columns)
        height, width = frames.shape[1:3]
        grid = {"frames": len(frames), "fps": float(fps), "width": width, "height": height, "columns": columns}
        if scaled_from:
            grid["scaled_from"] = scaled_from
        sheet = tile_frames(frames, columns)
        return self.images.put(sheet, {**json_safe(metadata), CLIP_KEY: grid}, fmt="jpeg", quality=self.quality)

    def sample(self, rng: np.random.Generator) -> tuple[tuple[np.ndarray, float], dict[str, Any]] | None:
        """A uniformly chosen clip as ((frames, fps), metadata), or None when there is none readable."""
        for _ in range(4):
            drawn = self.images.sample(rng)
            if drawn is None:
                return None
            sheet, metadata = drawn
            grid = metadata.get(CLIP_KEY)
            try:
                frames = untile_frames(sheet, grid)
                fps = float(grid["fps"])
                if not (math.isfinite(fps) and fps > 0):
                    raise ValueError(f"bad fps {fps!r}")
            except (ValueError, TypeError) as exc:
                self.images.discard(str(metadata.get(ITEM_KEY)), f"not a clip sheet ({exc})")
                continue
            return (frames, fps), metadata
        return None
