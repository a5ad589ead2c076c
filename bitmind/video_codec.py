"""Video clip codec for `VideoSynapse`: AV1 in an IVF stream, base64, behind a version prefix.

Why AV1 and not JPEG frames: the reference sends JPEG frames concatenated, zlib-compressed and base85-encoded.
zlib gains nothing on JPEG data and base85 already costs less than base64, so no JPEG-frame container can be
3× smaller than it; only coding across frames can. At the same fidelity (PSNR against the original frames) AV1
(SVT-AV1, preset 6) was smaller than H.264 (x264, even at its veryslow preset) on the shared clips; the figures
against the reference are in the README (`benchmarks/video_payload.py`). Decoding uses dav1d, one thread.
Why IVF and our own packet reader: IVF is a 32-byte header and a 12-byte header per frame, so frame count and
frame size are read and checked before any pixel is decoded, and no general demuxer parses hostile bytes.

Wire format, version 1: ``"bmv1:" + base64(IVF with fourcc AV01)``. A later format gets a new prefix; a
decoder refuses prefixes it does not know with a clear error. Every failure raises `VideoDecodeError`.
"""

import base64
import io
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from bitmind.image_codec import ImageDecodeError, decode_base64, to_rgb

# SVT-AV1 prints banner lines on stderr for every encoder it opens unless told otherwise (1 = errors only).
os.environ.setdefault("SVT_LOG", "1")

import av  # noqa: E402 - must follow SVT_LOG

__all__ = ["FORMAT_PREFIX", "VideoDecodeError", "VideoLimits", "decode_clip", "encode_clip", "quality_to_crf"]

FORMAT_PREFIX = "bmv1:"
_IVF_HEADER = struct.Struct("<4sHH4sHHIII")  # signature, version, header size, fourcc, w, h, rate, scale, frames
_IVF_FRAME = struct.Struct("<IQ")  # frame size, timestamp


class VideoDecodeError(ImageDecodeError):
    """The payload is not an acceptable clip; the message says why. An `ImageDecodeError`, so code that
    guards image decoding guards clips the same way."""


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 8 * 1024 * 1024  # base64 of it fits the miner's default 16 MiB request limit
    max_frames: int = 64
    max_pixels: int = 1024 * 1024  # per frame
    max_clip_pixels: int = 64 * 512 * 512  # all frames together: bounds the decoded array (~50 MB)
    min_side: int = 8
    max_decode_s: float = 2.0


def quality_to_crf(quality: int) -> int:
    """Map a JPEG-style quality (1..100) to an AV1 CRF. Quality 75 → CRF 27, chosen so a clip keeps about the
    fidelity of JPEG quality-75 frames (PSNR against the originals, shared clips); each quality step moves the CRF
    by 0.6."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    return int(min(63, max(1, round(27 + (75 - int(quality)) * 0.6))))


def _as_frames(frames: Any) -> np.ndarray:
    if isinstance(frames, np.ndarray):
        array = frames
    else:
        images = list(frames)
        if not images:
            raise ValueError("a clip needs at least one frame")
        arrays = [np.asarray(to_rgb(f) if isinstance(f, Image.Image) else f) for f in images]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"all frames of a clip must have one size, got {sorted({a.shape for a in arrays})}")
        array = np.stack(arrays)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"frames must be shaped (T>0, H, W, 3), got {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {array.dtype}")
    return array


def encode_clip(frames: np.ndarray | list[Image.Image], quality: int = 75, limits: VideoLimits = VideoLimits()) -> str:
    """Encode RGB frames (T, H, W, 3) uint8, or PIL images of one size, as a version-1 clip payload."""
    array = _as_frames(frames)
    count, height, width = array.shape[:3]
    if count > limits.max_frames or width * height > limits.max_pixels or min(width, height) < limits.min_side:
        raise ValueError(f"clip of {count} frames of {width}x{height} is outside the decoder's limits {limits}")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="ivf") as container:
        stream = container.add_stream("libsvtav1", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(quality_to_crf(quality)), "preset": "6"}
        for frame in array:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return FORMAT_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def _packets(raw: bytes, limits: VideoLimits) -> tuple[int, int, list[bytes]]:
    """Split an IVF stream into frame packets, checking its header against `limits` first."""
    if len(raw) < _IVF_HEADER.size:
        raise VideoDecodeError("clip payload is too short to be an IVF stream")
    signature, _, header_size, fourcc, width, height, _, _, _ = _IVF_HEADER.unpack_from(raw)
    if signature != b"DKIF" or fourcc != b"AV01":
        raise VideoDecodeError("clip payload is not an AV1 IVF stream")
    if width * height > limits.max_pixels:
        raise VideoDecodeError(f"clip frames of {width}x{height} exceed the limit of {limits.max_pixels} pixels")
    if min(width, height) < limits.min_side:
        raise VideoDecodeError(f"clip frames of {width}x{height} are smaller than {limits.min_side} pixels a side")
    packets, offset = [], max(header_size, _IVF_HEADER.size)
    while offset < len(raw):
        if offset + _IVF_FRAME.size > len(raw):
            raise VideoDecodeError("clip payload is truncated inside a frame header")
        size, _ = _IVF_FRAME.unpack_from(raw, offset)
        offset += _IVF_FRAME.size
        if size == 0 or offset + size > len(raw):
            raise VideoDecodeError("clip payload has an empty or truncated frame")
        packets.append(raw[offset : offset + size])
        offset += size
        if len(packets) > limits.max_frames:
            raise VideoDecodeError(f"clip has more than {limits.max_frames} frames")
    if not packets:
        raise VideoDecodeError("clip has no frames")
    if len(packets) * width * height > limits.max_clip_pixels:
        raise VideoDecodeError(f"clip of {len(packets)} frames of {width}x{height} exceeds {limits.max_clip_pixels} pixels")
    return width, height, packets


def decode_clip(payload: str | bytes, limits: VideoLimits = VideoLimits()) -> np.ndarray:
    """Decode a clip payload into RGB frames (T, H, W, 3) uint8, enforcing `limits` (size, frame count, pixels
    per frame and per clip, one frame size, wall-clock decode time)."""
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("ascii")
        except UnicodeDecodeError as exc:
            raise VideoDecodeError("clip payload is not text") from exc
    if not isinstance(payload, str) or not payload:
        raise VideoDecodeError("empty clip payload")
    if not payload.startswith(FORMAT_PREFIX):
        version = payload.split(":", 1)[0][:16] if ":" in payload[:17] else "none"
        raise VideoDecodeError(f"unknown clip format (prefix {version!r}); this decoder reads {FORMAT_PREFIX!r}")
    try:
        raw = decode_base64(payload[len(FORMAT_PREFIX) :], limits.max_bytes)
    except ImageDecodeError as exc:
        raise VideoDecodeError(f"clip {exc}") from exc
    width, height, packets = _packets(raw, limits)
    deadline = time.monotonic() + limits.max_decode_s
    frames: list[np.ndarray] = []
    try:
        codec = av.CodecContext.create("libdav1d", "r")
        codec.thread_count = 1
        codec.options = {"max_pixels": str(limits.max_pixels), "max_frame_delay": "1"}
        for packet in [*packets, None]:
            for frame in codec.decode(None if packet is None else av.Packet(packet)):
                if (frame.width, frame.height) != (width, height):
                    raise VideoDecodeError(f"clip frame of {frame.width}x{frame.height} in a {width}x{height} clip")
                if len(frames) == limits.max_frames:
                    raise VideoDecodeError(f"clip has more than {limits.max_frames} frames")
                frames.append(frame.to_ndarray(format="rgb24"))
            if time.monotonic() > deadline:
                raise VideoDecodeError(f"clip took longer than {limits.max_decode_s} s to decode")
    except VideoDecodeError:
        raise
    except (av.FFmpegError, ValueError, MemoryError) as exc:
        raise VideoDecodeError(f"corrupt clip: {exc}") from exc
    if not frames:
        raise VideoDecodeError("clip decoded to no frames")
    return np.stack(frames)
