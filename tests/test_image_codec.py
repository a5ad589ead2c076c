"""The codec is the miner's first line of defence: every hostile payload must raise ImageDecodeError, fast."""

import base64
import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from bitmind.image_codec import (
    DecodeLimits,
    ImageDecodeError,
    decode_bytes,
    decode_cell,
    decode_image,
    encode_image,
)


def _b64(image: Image.Image, fmt: str = "PNG", **save_kwargs) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return base64.b64encode(buffer.getvalue()).decode()


def _rgb(width: int = 64, height: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_jpeg_round_trip_gives_rgb_of_requested_size():
    payload = encode_image(_rgb(300, 200), size=256, quality=90)
    image = decode_image(payload)
    assert image.mode == "RGB" and image.size == (256, 256)


def test_encode_keeps_size_when_asked_and_rejects_bad_quality():
    assert decode_image(encode_image(_rgb(64, 48), size=None)).size == (64, 48)
    with pytest.raises(ValueError):
        encode_image(_rgb(), quality=0)


@pytest.mark.parametrize("payload", ["", b""])
def test_empty_payload(payload):
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(payload)


@pytest.mark.parametrize("payload", ["not base64!!", "abc", "é" * 8, "aGVsbG8=\n\x00"])
def test_not_base64(payload):
    with pytest.raises(ImageDecodeError, match="base64"):
        decode_image(payload)


def test_base64_of_non_image_bytes_is_unsupported():
    with pytest.raises(ImageDecodeError, match="unreadable"):
        decode_image(base64.b64encode(b"hello world, not an image" * 10).decode())


def test_oversized_payload_rejected_before_decoding():
    limits = DecodeLimits(max_bytes=1000)
    payload = base64.b64encode(b"\xff" * 5000).decode()
    with pytest.raises(ImageDecodeError, match="larger than 1000 bytes"):
        decode_image(payload, limits)


def _png(width: int, height: int, idat: bytes | None = None) -> str:
    """A hand-built 8-bit grayscale PNG: the header may claim any size, the data may be anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    if idat is not None:
        png += chunk(b"IDAT", idat)
    return base64.b64encode(png + chunk(b"IEND", b"")).decode()


def test_decompression_bomb_rejected_from_header():
    # 5000x5000 zero pixels compress to ~25 KB: the pixel limit must refuse it before decoding.
    idat = zlib.compress(b"\x00" * (5001 * 5000), 9)
    payload = _png(5000, 5000, idat)
    assert len(payload) < 100_000
    with pytest.raises(ImageDecodeError, match="more than the limit"):
        decode_image(payload, DecodeLimits(max_pixels=4096 * 4096))


def test_pillow_bomb_guard_also_maps_to_decode_error():
    # Above Pillow's own threshold the error comes from Pillow; it must still be ImageDecodeError.
    with pytest.raises(ImageDecodeError, match="decompression bomb|more than the limit"):
        decode_image(_png(100_000, 100_000), DecodeLimits(max_pixels=10**12))


def _jpeg_with_exif(entries: bytes, count: int) -> str:
    """A small JPEG with an APP1 EXIF block of `count` big-endian IFD entries."""
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", count) + entries + b"\0\0\0\0"
    app1 = b"Exif\0\0" + tiff
    jpeg = base64.b64decode(_b64(_rgb(48, 40), fmt="JPEG"))
    return base64.b64encode(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]).decode()


def test_a_mistyped_exif_tag_is_a_refusal_not_a_crash():
    # Orientation 6 (so exif_transpose rewrites the EXIF) beside a LONG tag stored as ASCII: Pillow raises
    # struct.error there, which escaped the codec and failed the miner's whole batch.
    entries = struct.pack(">HHII", 0x0112, 3, 1, 6 << 16) + struct.pack(">HHI4s", 0x0125, 2, 4, b"cam\0")
    with pytest.raises(ImageDecodeError, match="unreadable"):
        decode_image(_jpeg_with_exif(entries, 2))
    rotated = decode_image(_jpeg_with_exif(struct.pack(">HHII", 0x0112, 3, 1, 6 << 16), 1))
    assert rotated.size == (40, 48)  # a well-formed orientation still turns the image


def test_absurd_aspect_ratio_rejected():
    with pytest.raises(ImageDecodeError, match="aspect ratio"):
        decode_image(_b64(_rgb(2000, 20)))


def test_tiny_image_rejected():
    with pytest.raises(ImageDecodeError, match="smaller than"):
        decode_image(_b64(_rgb(4, 4)))


def test_truncated_jpeg_rejected():
    buffer = io.BytesIO()
    _rgb(256, 256).save(buffer, format="JPEG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(base64.b64encode(truncated).decode())


def test_unsupported_format_rejected():
    buffer = io.BytesIO()
    _rgb(32, 32).save(buffer, format="PPM")
    with pytest.raises(ImageDecodeError, match="not in an accepted format"):
        decode_image(base64.b64encode(buffer.getvalue()).decode())


def test_png_with_corrupt_chunk_rejected():
    raw = bytearray(base64.b64decode(_b64(_rgb(32, 32))))
    raw[40:60] = b"\x00" * 20  # corrupt the IDAT data
    with pytest.raises(ImageDecodeError):
        decode_image(base64.b64encode(bytes(raw)).decode())


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (40, 30), 128),
        Image.new("1", (40, 30), 1),
        Image.new("P", (40, 30), 3),
        Image.new("CMYK", (40, 30), (0, 255, 0, 0)),
        Image.new("RGBA", (40, 30), (10, 20, 30, 0)),
        Image.new("LA", (40, 30), (100, 255)),
    ],
    ids=["grayscale", "bilevel", "palette", "cmyk", "rgba", "gray-alpha"],
)
def test_modes_convert_to_rgb(image):
    fmt = "JPEG" if image.mode == "CMYK" else ("TIFF" if image.mode == "LA" else "PNG")
    decoded = decode_image(_b64(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (40, 30)


def test_transparent_pixels_become_white():
    decoded = decode_image(_b64(Image.new("RGBA", (16, 16), (10, 20, 30, 0))))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_grayscale_is_scaled_not_clipped():
    array = np.full((20, 20), 32768, dtype=np.uint16)
    decoded = decode_image(_b64(Image.fromarray(array)))
    assert decoded.mode == "RGB"
    assert 120 <= decoded.getpixel((0, 0))[0] <= 135


def test_palette_with_transparency():
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    assert decode_image(_b64(image)).getpixel((0, 0)) == (255, 255, 255)


def test_png_header_without_data_is_truncated():
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(_png(64, 64))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_random_corruptions_never_escape_as_other_errors(fmt):
    """Flip random bytes of valid files: decoding either succeeds with RGB or raises ImageDecodeError."""
    rng = np.random.default_rng(1234)
    original = bytearray(base64.b64decode(_b64(_rgb(48, 40), fmt)))
    for _ in range(150):
        mutated = bytearray(original)
        for position in rng.integers(0, len(mutated), size=int(rng.integers(1, 12))):
            mutated[position] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            mutated = mutated[: int(rng.integers(1, len(mutated)))]
        try:
            decoded = decode_image(base64.b64encode(bytes(mutated)).decode())
        except ImageDecodeError:
            continue
        assert decoded.mode == "RGB"


def test_decode_bytes_reads_files_and_enforces_the_same_limits():
    raw = base64.b64decode(_b64(_rgb(40, 30), "PNG"))
    assert decode_bytes(raw).size == (40, 30)
    with pytest.raises(ImageDecodeError, match="larger than 10 bytes"):
        decode_bytes(raw, DecodeLimits(max_bytes=10))
    with pytest.raises(ImageDecodeError, match="not in an accepted format"):
        decode_bytes(b"plain text, not an image")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_bytes(b"")


def test_decoding_on_many_threads_at_once_keeps_every_check():
    """Workers decode concurrently: each payload gets its own verdict (no check switched off by another thread's
    state), and the process's warning filters are left as they were."""
    good = [base64.b64decode(_b64(_rgb(40 + i, 30 + i))) for i in range(8)]
    bomb = base64.b64decode(_png(5000, 5000, zlib.compress(b"\x00" * (5001 * 5000), 9)))
    too_small = base64.b64decode(_b64(_rgb(4, 4)))
    limits = DecodeLimits(max_pixels=4096 * 4096)
    jobs = [("good", raw) for raw in good] * 6 + [("bomb", bomb)] * 12 + [("small", too_small)] * 12
    filters_before = list(warnings.filters)

    def decode(job):
        kind, raw = job
        try:
            return kind, decode_bytes(raw, limits).size
        except ImageDecodeError as exc:
            return kind, str(exc)

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(decode, jobs * 3))
    assert warnings.filters == filters_before
    for (kind, raw), (_, outcome) in zip(jobs * 3, outcomes):
        if kind == "good":
            assert outcome == Image.open(io.BytesIO(raw)).size
        elif kind == "bomb":
            assert "more than the limit" in outcome
        else:
            assert "smaller than" in outcome


def test_header_limits_hold_without_any_warning_filter():
    """The pixel limit is an explicit header check: it holds whatever the warning filters say."""
    bomb = base64.b64decode(_png(5000, 5000, zlib.compress(b"\x00" * (5001 * 5000), 9)))
    for action in ("ignore", "default"):
        with warnings.catch_warnings():
            warnings.simplefilter(action)
            with pytest.raises(ImageDecodeError, match="more than the limit"):
                decode_bytes(bomb, DecodeLimits(max_pixels=4096 * 4096))


def test_dataset_cells_decode_from_bytes_or_a_path_with_the_same_limits(tmp_path):
    raw = base64.b64decode(_b64(_rgb(40, 30)))
    (tmp_path / "a.png").write_bytes(raw)
    assert decode_cell({"bytes": raw, "path": None}).size == (40, 30)
    assert decode_cell({"bytes": None, "path": str(tmp_path / "a.png")}).size == (40, 30)
    with pytest.raises(ImageDecodeError, match="larger than 10 bytes"):
        decode_cell({"bytes": None, "path": str(tmp_path / "a.png")}, DecodeLimits(max_bytes=10))
    with pytest.raises(ImageDecodeError, match="cannot read image file"):
        decode_cell({"bytes": None, "path": str(tmp_path / "missing.png")})
    with pytest.raises(ImageDecodeError, match="neither bytes nor a path"):
        decode_cell({"bytes": b"", "path": ""})
    with pytest.raises(ImageDecodeError, match="holds no image"):
        decode_cell("a.png")


def test_max_side_shrinks_big_images_and_keeps_small_ones():
    big = base64.b64decode(_b64(_rgb(900, 600), "JPEG"))
    assert decode_bytes(big, max_side=256).size == (256, 171)
    assert decode_bytes(base64.b64decode(_b64(_rgb(40, 30))), max_side=256).size == (40, 30)
