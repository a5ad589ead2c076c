"""The clip codec (`bitmind.video_codec`) and video file reader (`bitmind.video_file`): round trips through the real
SVT-AV1 encoder and dav1d decoder, and every kind of bad input ending in `VideoDecodeError`."""

import base64
import io
import struct

import numpy as np
import pytest
from PIL import Image

from bitmind.image_codec import ImageDecodeError
from bitmind.video_codec import FORMAT_PREFIX, VideoDecodeError, VideoLimits, decode_clip, encode_clip, quality_to_crf
from bitmind.video_file import read_video
from tests._required import shared_data


def moving_clip(frames: int = 8, height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth gradient sliding right one pixel a frame, with a little noise: codec-friendly and not constant."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    clip = []
    for t in range(frames):
        frame = np.stack([(x + t) * 2 % 256, y * 3 % 256, (x + y + 2 * t) % 256], -1).astype(np.float64)
        clip.append(np.clip(frame + rng.normal(0, 2, frame.shape), 0, 255).astype(np.uint8))
    return np.stack(clip)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def ivf(packets: list[bytes], width: int = 64, height: int = 64, fourcc: bytes = b"AV01") -> str:
    """A version-1 payload around hand-made IVF packets."""
    header = struct.pack("<4sHH4sHHIIII", b"DKIF", 0, 32, fourcc, width, height, 8, 1, len(packets), 0)
    body = b"".join(struct.pack("<IQ", len(p), i) + p for i, p in enumerate(packets))
    return FORMAT_PREFIX + base64.b64encode(header + body).decode()


def ivf_packets(payload: str) -> tuple[bytes, list[bytes]]:
    raw = base64.b64decode(payload[len(FORMAT_PREFIX) :])
    packets, offset = [], 32
    while offset < len(raw):
        size = struct.unpack_from("<I", raw, offset)[0]
        packets.append(raw[offset + 12 : offset + 12 + size])
        offset += 12 + size
    return raw[:32], packets


@pytest.fixture(scope="module")
def payload() -> str:
    return encode_clip(moving_clip())


def test_round_trip_keeps_shape_and_fidelity(payload):
    original = moving_clip()
    decoded = decode_clip(payload)
    assert payload.startswith("bmv1:")
    assert decoded.shape == original.shape and decoded.dtype == np.uint8
    assert psnr(original, decoded) > 30.0


def test_pil_frames_and_quality_map_to_smaller_payloads_at_lower_quality():
    frames = [Image.fromarray(f) for f in moving_clip()]
    high, low = encode_clip(frames, quality=95), encode_clip(frames, quality=20)
    assert decode_clip(high).shape == (8, 64, 96, 3)
    assert len(low) < len(high)
    assert quality_to_crf(75) == 27 and quality_to_crf(100) < quality_to_crf(1) <= 63
    with pytest.raises(ValueError, match="quality"):
        quality_to_crf(0)


@pytest.mark.parametrize(
    "frames, reason",
    [
        (np.zeros((0, 64, 64, 3), np.uint8), "T>0"),
        ([], "at least one frame"),
        (np.zeros((2000, 16, 16, 3), np.uint8), "limits"),
        ([np.zeros((64, 64, 3), np.uint8), np.zeros((32, 64, 3), np.uint8)], "one size"),
        (np.zeros((2, 64, 64, 3), np.float32), "uint8"),
        (np.zeros((2, 64, 64), np.uint8), "T>0"),
    ],
)
def test_encoder_refuses_clips_it_cannot_send(frames, reason):
    with pytest.raises(ValueError, match=reason):
        encode_clip(frames)


def test_video_decode_error_is_an_image_decode_error():
    # Code guarding image decoding (the miner's batcher, bitmind-detect) guards clips with the same except clause.
    assert issubclass(VideoDecodeError, ImageDecodeError)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("", "empty"),
        (b"\xff\xfe", "not text"),
        ("JFIF....", "unknown clip format"),
        ("bmv9:AAAA", "unknown clip format .*bmv9"),
        ("bmv1:", "empty"),
        ("bmv1:@@@@", "base64"),
        ("bmv1:" + base64.b64encode(b"DKIF").decode(), "too short"),
    ],
)
def test_malformed_payloads_are_refused(bad, reason):
    with pytest.raises(VideoDecodeError, match=reason):
        decode_clip(bad)


def test_a_non_video_file_in_the_video_field_is_refused():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    with pytest.raises(VideoDecodeError, match="not an AV1 IVF"):
        decode_clip(FORMAT_PREFIX + base64.b64encode(buffer.getvalue() * 4).decode())
    # An image payload sent where a clip belongs (no version prefix) names the format it expected.
    with pytest.raises(VideoDecodeError, match="unknown clip format"):
        decode_clip(base64.b64encode(buffer.getvalue()).decode())


def test_header_limits_are_checked_before_decoding(payload):
    with pytest.raises(VideoDecodeError, match="exceed the limit"):
        decode_clip(ivf([b"x"], width=8192, height=8192))
    with pytest.raises(VideoDecodeError, match="smaller than"):
        decode_clip(ivf([b"x"], width=4, height=64))
    with pytest.raises(VideoDecodeError, match="more than 64 frames"):
        decode_clip(ivf([b"x"] * 5000))
    with pytest.raises(VideoDecodeError, match="no frames"):
        decode_clip(ivf([]))
    with pytest.raises(VideoDecodeError, match="not an AV1"):
        decode_clip(ivf([b"x"], fourcc=b"VP90"))
    with pytest.raises(VideoDecodeError, match="exceeds .* pixels"):
        decode_clip(payload, VideoLimits(max_clip_pixels=64 * 96 * 4))
    with pytest.raises(VideoDecodeError, match="larger than 100 bytes"):
        decode_clip(payload, VideoLimits(max_bytes=100))
    with pytest.raises(VideoDecodeError, match="longer than"):
        decode_clip(payload, VideoLimits(max_decode_s=0.0))


def test_truncated_and_empty_frames_are_refused(payload):
    raw = base64.b64decode(payload[len(FORMAT_PREFIX) :])
    with pytest.raises(VideoDecodeError, match="truncated"):
        decode_clip(FORMAT_PREFIX + base64.b64encode(raw[: len(raw) - 10]).decode())
    header, packets = ivf_packets(payload)
    with pytest.raises(VideoDecodeError, match="empty or truncated"):
        decode_clip(ivf([packets[0], b""], 96, 64))


def test_mixed_frame_sizes_in_one_stream_are_refused(payload):
    # Packets of a 64x96 clip followed by those of a 32x48 clip: AV1 allows the size change, the clip format not.
    _, big = ivf_packets(payload)
    _, small = ivf_packets(encode_clip(moving_clip(4, 32, 48)))
    with pytest.raises(VideoDecodeError, match="clip frame of 48x32 in a 96x64 clip"):
        decode_clip(ivf(big + small, 96, 64))


def test_corrupt_frames_give_frames_or_a_clear_error_never_a_crash(payload):
    header, packets = ivf_packets(payload)
    rng = np.random.default_rng(0)
    for trial in range(12):
        damaged = []
        for packet in packets:
            data = bytearray(packet)
            for position in rng.integers(0, len(data), size=max(1, len(data) // 20)):
                data[position] = int(rng.integers(0, 256))
            damaged.append(bytes(data))
        try:
            frames = decode_clip(ivf(damaged, 96, 64))
        except VideoDecodeError:
            continue
        assert frames.dtype == np.uint8 and frames.shape[1:] == (64, 96, 3), trial


def test_read_video_reads_a_shared_clip_and_refuses_non_videos(tmp_path):
    clip = sorted(shared_data("video/clips/real").glob("*.mp4"))[0]
    frames = read_video(clip)
    assert frames.ndim == 4 and frames.shape[-1] == 3 and 1 <= len(frames) <= 64
    assert min(frames.shape[1:3]) == 256  # the shared clips' short side
    assert read_video(clip.read_bytes()).shape == frames.shape
    assert len(read_video(clip, seconds=1.0)) < len(frames)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 50)
    for bad, reason in ((text, "unreadable video"), (tmp_path / "missing.mp4", "cannot read"), (b"", "unreadable")):
        with pytest.raises(VideoDecodeError, match=reason):
            read_video(bad)
    with pytest.raises(VideoDecodeError, match="exceeds the limit"):
        read_video(clip, VideoLimits(max_bytes=1000))
    with pytest.raises(VideoDecodeError, match="outside the limits"):
        read_video(clip, VideoLimits(max_pixels=100 * 100))


def test_a_stream_larger_than_its_header_says_is_refused_before_decoding():
    # The IVF header claims 64x64; the AV1 sequence header inside says 512x512. dav1d is given the pixel limit, so
    # the frame is refused when its size is parsed, not after a large allocation.
    _, packets = ivf_packets(encode_clip(np.zeros((2, 512, 512, 3), np.uint8)))
    with pytest.raises(VideoDecodeError, match="corrupt clip"):
        decode_clip(ivf(packets, 64, 64), VideoLimits(max_pixels=64 * 64 * 4))
