"""Clip sampling: which frames of a cached video a challenge shows, and two-video splices.

The reference drew 8-24 frames at 8-30 fps from a window of at most 2 s, and spliced 20 % of clips from two
videos. We keep those ranges and fix what leaked or broke there:
- Frames are chosen by TIME, at a rate never above the source's own: a 8 fps source sampled "at 30 fps" would
  repeat frames, and repeated frames would tell a miner which videos are slow (generated clips often are).
  The count is cut so the window stays within `max_window_s` and within the video.
- A splice joins two videos of the SAME label (a real+fake splice has no honest label) at one frame rate, the
  second resized (centre crop to the first's aspect, then resize) to the first's frame size, so the cut is the
  only seam; it is recorded in the metadata (`splice_at`, both sources).
- Everything drawn is returned in a JSON-able description (rate, indices, start time), so a challenge can be audited.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["ClipParams", "ClipSampler", "SampledClip"]

MIN_FRAMES = 4  # below this a source is too short for a challenge


@dataclass(frozen=True)
class ClipParams:
    """Frame-count, frame-rate and window ranges of a clip, and the share of two-video splices."""

    min_frames: int = 8
    max_frames: int = 24
    min_fps: float = 8.0
    max_fps: float = 30.0
    max_window_s: float = 2.0
    splice_prob: float = 0.2

    def __post_init__(self) -> None:
        if not MIN_FRAMES <= self.min_frames <= self.max_frames:
            raise ValueError(f"need {MIN_FRAMES} <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if not (math.isfinite(self.max_fps) and 0 < self.min_fps <= self.max_fps):
            raise ValueError(f"need 0 < min_fps <= max_fps, got {self.min_fps}, {self.max_fps}")
        if not (math.isfinite(self.max_window_s) and self.max_window_s > 0):
            raise ValueError(f"max_window_s must be positive, got {self.max_window_s}")
        if not 0.0 <= self.splice_prob <= 1.0:
            raise ValueError(f"splice_prob must be in [0, 1], got {self.splice_prob}")


@dataclass(frozen=True)
class SampledClip:
    """Frames (T, H, W, 3) uint8 at `fps`, with the description of how they were drawn."""

    frames: np.ndarray
    fps: float
    info: dict[str, Any]


class ClipSampler:
    """Draws the frames of one clip from a decoded video, or a splice of two."""

    def __init__(self, params: ClipParams = ClipParams()) -> None:
        self.params = params

    def wants_splice(self, rng: np.random.Generator) -> bool:
        return bool(rng.random() < self.params.splice_prob)

    def plan(self, rng: np.random.Generator, *sources: tuple[float, int]) -> tuple[float, int] | None:
        """(rate, frame count) that every source, given as (fps, frames), can show at that rate: the rate is never
        above a source's own and the frames fit in each; None when a source is too short."""
        p = self.params
        fps = min(float(rng.uniform(p.min_fps, p.max_fps)), *(source_fps for source_fps, _ in sources))
        count = int(rng.integers(p.min_frames, p.max_frames + 1))
        window_frames = int(math.floor(p.max_window_s * fps + 1e-9))  # frames i/fps, i < count, inside the window
        available = min(int(math.floor((frames - 1) * fps / source_fps + 1e-9)) + 1 for source_fps, frames in sources)
        count = min(count, window_frames, available)
        return (fps, count) if count >= MIN_FRAMES else None

    def take(self, rng: np.random.Generator, frames: np.ndarray, source_fps: float, fps: float, count: int
             ) -> tuple[np.ndarray, dict[str, Any]]:
        """`count` frames at `fps` (<= `source_fps`) from a window starting at a uniform frame that keeps them inside
        the video. Offsets are whole source frames `floor(i * source_fps / fps)`: strictly increasing, since the step
        is at least one frame, so no frame is shown twice."""
        offsets = np.floor(np.arange(count) * (source_fps / fps) + 1e-9).astype(int)
        start = int(rng.integers(0, max(0, len(frames) - 1 - int(offsets[-1])) + 1))
        indices = np.minimum(start + offsets, len(frames) - 1)
        return frames[indices], {"start_s": round(start / source_fps, 4), "indices": indices.tolist()}

    def sample(self, rng: np.random.Generator, frames: np.ndarray, source_fps: float) -> SampledClip | None:
        """One clip from one video; None when the video is too short for `MIN_FRAMES` frames."""
        planned = self.plan(rng, (source_fps, len(frames)))
        if planned is None:
            return None
        fps, count = planned
        taken, info = self.take(rng, frames, source_fps, fps, count)
        return SampledClip(taken, fps, {"fps": round(fps, 4), "frames": count, **info})

    def splice(self, rng: np.random.Generator, first: tuple[np.ndarray, float], second: tuple[np.ndarray, float]
               ) -> SampledClip | None:
        """A clip whose first part comes from `first` and the rest from `second` ((frames, fps) each), at one rate
        and the first's frame size; None when either video is too short."""
        (frames_a, fps_a), (frames_b, fps_b) = first, second
        planned = self.plan(rng, (fps_a, len(frames_a)), (fps_b, len(frames_b)))
        if planned is None:
            return None
        fps, count = planned
        cut = int(rng.integers(2, count - 1))  # both parts have at least 2 frames: a splice, not a flash
        part_a, info_a = self.take(rng, frames_a, fps_a, fps, cut)
        part_b, info_b = self.take(rng, frames_b, fps_b, fps, count - cut)
        part_b = _fit_frames(part_b, part_a.shape[2], part_a.shape[1])
        info = {"fps": round(fps, 4), "frames": count, "splice_at": cut, "parts": [info_a, info_b]}
        return SampledClip(np.concatenate([part_a, part_b]), fps, info)


def _fit_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre-crop each frame to width:height, then resize to width x height."""
    if frames.shape[1:3] == (height, width):
        return frames
    source_h, source_w = frames.shape[1:3]
    scale = min(source_w / width, source_h / height)
    crop_w, crop_h = width * scale, height * scale
    left, top = (source_w - crop_w) / 2, (source_h - crop_h) / 2
    box = (left, top, left + crop_w, top + crop_h)
    return np.stack([
        np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BILINEAR, box=box))
        for frame in frames
    ])
