"""Read a video file (MP4, WebM, MKV, GIF, ... anything FFmpeg opens) into RGB frames, with limits.

Used where clips come as files: `bitmind-detect`, clip datasets for training and the arena. Challenges arrive as
`bitmind.video_codec` payloads instead. Frame size is checked from the stream header before any frame is decoded;
the file size, number of frames kept, pixels and decode time are bounded like a challenge payload's, and every
failure raises `VideoDecodeError`. Long videos are read from their start over `seconds`, keeping every k-th frame
(k from the header's frame rate) so at most `limits.max_frames` frames are kept, evenly spaced in time.
"""

import io
import math
import os
import time
from pathlib import Path

import av
import numpy as np

from bitmind.video_codec import VideoDecodeError, VideoLimits

__all__ = ["FILE_LIMITS", "read_video"]

# Files are read whole; challenges are smaller. Frames: 4 s at 16 fps.
FILE_LIMITS = VideoLimits(max_bytes=256 * 1024 * 1024, max_frames=64, max_decode_s=20.0)


def _open(source: str | os.PathLike | bytes, max_bytes: int):
    if isinstance(source, (bytes, bytearray)):
        if len(source) > max_bytes:
            raise VideoDecodeError(f"video of {len(source)} bytes exceeds the limit of {max_bytes}")
        return io.BytesIO(source)
    if str(source).startswith(("hf://", "http://", "https://", "s3://", "gs://")):
        import fsspec  # noqa: PLC0415 - remote dataset cells only

        try:
            with fsspec.open(str(source), "rb") as handle:
                raw = handle.read(max_bytes + 1)
        except (OSError, ValueError) as exc:
            raise VideoDecodeError(f"cannot read video {source!s}: {exc}") from exc
        return _open(raw, max_bytes)
    path = Path(source)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise VideoDecodeError(f"cannot read video {str(path)!r}: {exc.strerror or exc}") from exc
    if size > max_bytes:
        raise VideoDecodeError(f"video {str(path)!r} of {size} bytes exceeds the limit of {max_bytes}")
    return str(path)


def read_video(
    source: str | os.PathLike | bytes, limits: VideoLimits = FILE_LIMITS, seconds: float = 4.0
) -> np.ndarray:
    """RGB frames (T, H, W, 3) uint8 of the first `seconds` of a video file (a path, an fsspec URL or the bytes)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    handle = _open(source, limits.max_bytes)
    deadline = time.monotonic() + limits.max_decode_s
    frames: list[np.ndarray] = []
    try:
        with av.open(handle, "r", timeout=limits.max_decode_s) as container:
            if not container.streams.video:
                raise VideoDecodeError("file holds no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > limits.max_pixels or min(width, height) < limits.min_side:
                raise VideoDecodeError(f"video frames of {width}x{height} are outside the limits {limits}")
            stream.codec_context.options = {"max_pixels": str(limits.max_pixels)}
            stream.codec_context.thread_count = 1
            rate = float(stream.average_rate or 0) or 8.0
            step = max(1, math.ceil(rate * seconds / limits.max_frames))
            start: float | None = None
            for index, frame in enumerate(container.decode(stream)):
                stamp = frame.time if frame.time is not None else index / rate
                start = stamp if start is None else start
                if stamp - start >= seconds or len(frames) == limits.max_frames:
                    break
                if (frame.width, frame.height) != (width, height):
                    raise VideoDecodeError(f"video frame of {frame.width}x{frame.height} in a {width}x{height} stream")
                if index % step == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if time.monotonic() > deadline:
                    raise VideoDecodeError(f"video took longer than {limits.max_decode_s} s to decode")
    except VideoDecodeError:
        raise
    except (av.FFmpegError, ValueError, MemoryError, OSError) as exc:
        raise VideoDecodeError(f"unreadable video: {exc}") from exc
    if not frames:
        raise VideoDecodeError("video holds no frames")
    return np.stack(frames)
