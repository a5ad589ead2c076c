"""Video files into the validator's clip caches: decode a container (mp4, webm, gif ...) with limits.

Sources hand us whatever a dataset holds (OpenVid's mp4s, a local folder, a zip member): `read_video` decodes at
most `max_seconds` of it from `start_s`, scales frames so the longer side is at most `max_side` (in libswscale,
before the frames reach Python) and refuses files that are too large, hold no video stream, no decodable frame or
only a handful. Every failure raises the clip codec's `VideoDecodeError` (one error family for video), so a source skips the file with one log line.
"""

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitmind.video_codec import VideoDecodeError

__all__ = ["DecodedVideo", "read_video"]

MAX_FILE_BYTES = 512 * 1024 * 1024
# Frames decoded (kept or skipped) before giving up: bounds the work a hostile or very long file can cause.
MAX_DECODED_FRAMES = 4000
MIN_FRAMES = 2


@dataclass(frozen=True)
class DecodedVideo:
    """Frames (T, H, W, 3) uint8 RGB at `fps`, taken from `start_s` seconds into a video `duration_s` long."""

    frames: np.ndarray
    fps: float
    start_s: float
    duration_s: float | None
    source_size: tuple[int, int]  # (width, height) of the file's frames

    @property
    def seconds(self) -> float:
        return len(self.frames) / self.fps


def _scaled_size(width: int, height: int, max_side: int, max_short_side: int | None) -> tuple[int, int]:
    """Even sides (what video codecs store), longer side <= max_side and shorter side <= max_short_side, aspect
    kept."""
    scale = min(1.0, max_side / max(width, height), (max_short_side or math.inf) / min(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def read_video(
    data: bytes | str | Path,
    *,
    max_seconds: float = 4.0,
    max_side: int = 512,
    max_short_side: int | None = None,
    start_s: float | None = 0.0,
    rng: np.random.Generator | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    max_fps: float = 60.0,
) -> DecodedVideo:
    """Decode up to `max_seconds` of a video (bytes or a path) into RGB frames no larger than `max_side` (and, when
    given, with the shorter side no larger than `max_short_side`).

    `start_s=None` picks the start uniformly over the video's length (from the container's duration, needs `rng`),
    so a long video gives a different segment each time. Frames are kept by their timestamps, so a file whose
    frame rate varies still yields frames in time order at its average rate.
    """
    import av

    if isinstance(data, (str, Path)):
        path = Path(data)
        size = path.stat().st_size if path.exists() else -1
        if size < 0:
            raise VideoDecodeError(f"{path}: no such file")
        if size > max_bytes:
            raise VideoDecodeError(f"{path}: {size} bytes is more than the {max_bytes}-byte limit")
        data = path.read_bytes()
    if not data:
        raise VideoDecodeError("empty video file")
    if len(data) > max_bytes:
        raise VideoDecodeError(f"video of {len(data)} bytes is more than the {max_bytes}-byte limit")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise VideoDecodeError(f"not a readable video container: {exc}") from exc
    try:
        return _decode(container, max_seconds, max_side, max_short_side, start_s, rng, max_fps)
    except av.error.FFmpegError as exc:
        raise VideoDecodeError(f"corrupt video stream: {exc}") from exc
    finally:
        container.close()


def _decode(container, max_seconds: float, max_side: int, max_short_side: int | None, start_s: float | None,
            rng: np.random.Generator | None, max_fps: float) -> DecodedVideo:
    if not container.streams.video:
        raise VideoDecodeError("the file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if not (math.isfinite(fps) and 0 < fps <= max_fps):
        raise VideoDecodeError(f"unusable frame rate {fps}")
    duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    if duration is None and container.duration:
        duration = container.duration / 1e6
    if start_s is None:
        if rng is None:
            raise ValueError("a random start needs rng")
        start_s = float(rng.uniform(0.0, max(0.0, duration - max_seconds))) if duration else 0.0
    end_s = start_s + max_seconds
    frames: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    source_size = (0, 0)
    first_time: float | None = None
    for index, frame in enumerate(container.decode(stream)):
        if index >= MAX_DECODED_FRAMES:
            break
        time_s = float(frame.pts * stream.time_base) if frame.pts is not None and stream.time_base else index / fps
        if time_s < start_s - 0.5 / fps:
            continue
        if time_s >= end_s - 0.5 / fps:
            break
        if size is None:  # every frame takes the first one's size, so a stream that changes size stays one clip
            source_size = (frame.width, frame.height)
            size = _scaled_size(frame.width, frame.height, max_side, max_short_side)
            first_time = time_s
        frames.append(frame.to_ndarray(format="rgb24", width=size[0], height=size[1]))
    if len(frames) < MIN_FRAMES:
        raise VideoDecodeError(f"only {len(frames)} decodable frame(s) from {start_s:.2f} s")
    return DecodedVideo(np.stack(frames), fps, first_time or 0.0, duration, source_size)

