"""TALL: a clip's thumbnail layout (`base_miner.thumbnail`) read by the frozen multi-depth EfficientNet-Lite0 probe.

Why the probe and not a fine-tuned network: the shared clip set is 158 clips; a frozen backbone with a linear head
(`base_miner/detectors/probe.py`) cannot memorise them, and the same closed fit (`bitmind-fit-probe`) trains it.
The grid's side is `sqrt(frames) × tile_size`, so the network sees the tiles at the size they were cut.
Clips enter through `predict_clips`; the trainer and arena feed it grid images built the same way at load time
(`base_miner/training/clip_data.py`), so one layout serves both.
"""

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from base_miner.detectors.base import Prediction
from base_miner.detectors.probe import ProbeDetector, ProbeSettings
from base_miner.registry import register_detector
from base_miner.thumbnail import DEFAULT_FRAMES, DEFAULT_TILE, DEFAULT_TILE_MODE, grid_side, thumbnail_grid

__all__ = ["TallDetector", "TallSettings"]


class TallSettings(ProbeSettings):
    frames: int = Field(DEFAULT_FRAMES, ge=1, le=64, description="frames sampled evenly by time; a square number (4, 9, 16)")
    tile_size: int = Field(DEFAULT_TILE, ge=16, le=512, description="side of each frame's tile in the grid")
    tile_mode: Literal["crop", "resize"] = Field(DEFAULT_TILE_MODE, description="crop: native-scale centre crop; resize: whole frame")
    image_size: int = Field(0, ge=0, le=4096, description="the grid's side; 0 = sqrt(frames) × tile_size")

    @model_validator(mode="before")
    @classmethod
    def _grid_size(cls, data: Any) -> Any:
        if isinstance(data, dict):
            side = grid_side(int(data.get("frames", DEFAULT_FRAMES))) * int(data.get("tile_size", DEFAULT_TILE))
            if data.get("image_size", 0) not in (0, side):
                raise ValueError(f"image_size must be sqrt(frames) × tile_size = {side}, got {data['image_size']}")
            data = {**data, "image_size": side}
        return data


@register_detector("tall")
class TallDetector(ProbeDetector):
    """Thumbnail layout of `frames` frames → frozen EfficientNet-Lite0 stage statistics → linear head."""

    settings_model = TallSettings

    def grid(self, frames: np.ndarray):
        """The grid image this detector reads for one clip (T, H, W, 3) uint8."""
        return thumbnail_grid(frames, self.settings.frames, self.settings.tile_size, self.settings.tile_mode)

    def predict_clips(self, clips: Sequence[np.ndarray]) -> list[Prediction]:
        """Per-clip predictions, batched like images."""
        return self.predict_detailed([self.grid(clip) for clip in clips])
