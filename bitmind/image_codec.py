"""Image codec with hard limits: every image this project reads from outside goes through `decode_bytes`.

`decode_image` (base64, what a miner receives), `decode_cell` (a `datasets` image cell: real challenge images,
training rows) and the challenge cache's files all end in `decode_bytes`, so one set of checks guards them all:
size in bytes, accepted format and pixel count read from the header before any pixel is decoded. The checks use no
process-wide state (no warning filters), so decoding is safe on several threads at once.
All failures raise `ImageDecodeError` so callers handle one exception type.
"""

import base64
import binascii
import contextlib
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DecodeLimits",
    "ImageDecodeError",
    "decode_base64",
    "decode_bytes",
    "decode_cell",
    "decode_image",
    "encode_image",
    "fit_square",
    "refusing_bad_files",
    "to_rgb",
]

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


class ImageDecodeError(ValueError):
    """The payload is not an acceptable image; the message says why."""


@contextlib.contextmanager
def refusing_bad_files() -> Iterator[None]:
    """Turn whatever Pillow raises on a hostile or broken file, from the header to the last pixel, into
    `ImageDecodeError`: a caller that catches that one type can never be taken down by a file."""
    try:
        yield
    # Pillow's own guard at open() (over twice Image.MAX_IMAGE_PIXELS; the warning only under `-W error`).
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from exc
    except ImageDecodeError:
        raise
    # On a hostile file Pillow's plugins raise whatever their parsing hits (struct.error and AttributeError from a
    # mistyped EXIF tag in exif_transpose, KeyError, IndexError, MemoryError, ...): every one of them is a refusal.
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(f"unreadable or truncated image: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_aspect_ratio: float = 20.0
    min_side: int = 8


def decode_base64(payload: str | bytes, max_bytes: int) -> bytes:
    """Strict base64 to bytes, refusing payloads over `max_bytes` before decoding them (images and masks)."""
    if payload is None or len(payload) == 0:
        raise ImageDecodeError("empty payload")
    if isinstance(payload, str):
        try:
            payload = payload.encode("ascii")
        except UnicodeEncodeError as exc:
            raise ImageDecodeError("payload is not base64 (non-ASCII characters)") from exc
    # Checked before decoding so an oversized payload is never materialised twice.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageDecodeError(f"payload larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError(f"payload is not base64: {exc}") from exc
    if not raw:
        raise ImageDecodeError("empty payload")
    if len(raw) > max_bytes:
        raise ImageDecodeError(f"payload larger than {max_bytes} bytes")
    return raw


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (grayscale, palette, CMYK, alpha, 16-bit, float) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas become white, as most viewers show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(payload: str | bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode a base64 image payload into a fully loaded RGB PIL image, enforcing `limits`."""
    return decode_bytes(decode_base64(payload, limits.max_bytes), limits)


def decode_cell(value: Any, limits: DecodeLimits = DecodeLimits(), max_side: int | None = None) -> Image.Image:
    """Decode a `datasets` image cell as `Image(decode=False)` leaves it: {bytes, path}, the path local or remote
    (any fsspec URL, e.g. hf://). A file is read only up to `limits.max_bytes`. See `decode_bytes` for `max_side`."""
    if not isinstance(value, Mapping):
        raise ImageDecodeError(f"image cell of type {type(value).__name__} holds no image (expected {{bytes, path}})")
    raw = value.get("bytes")
    if not raw:
        path = value.get("path")
        if not path:
            raise ImageDecodeError("image cell holds neither bytes nor a path")
        raw = _read_file(str(path), limits.max_bytes)
    return decode_bytes(raw, limits, max_side)


def _read_file(path: str, max_bytes: int) -> bytes:
    import fsspec  # noqa: PLC0415 - only dataset cells without bytes need it

    try:
        with fsspec.open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"cannot read image file {path!r}: {exc}") from exc
    if len(raw) > max_bytes:
        raise ImageDecodeError(f"image file {path!r} is larger than {max_bytes} bytes")
    return raw


def decode_bytes(raw: bytes, limits: DecodeLimits = DecodeLimits(), max_side: int | None = None) -> Image.Image:
    """Decode an encoded image file (JPEG, PNG, ...) into a fully loaded RGB PIL image, enforcing `limits`.

    Format and size come from the header (`Image.open` reads no pixels), so a pixel bomb is refused before it
    is decoded. With `max_side`, a JPEG much larger than that decodes at a reduced scale (PIL `draft`, which makes
    big photos cheap; the pixel limit applies to what is decoded) and the result is shrunk to at most `max_side`.
    """
    if not raw:
        raise ImageDecodeError("empty payload")
    if len(raw) > limits.max_bytes:
        raise ImageDecodeError(f"payload larger than {limits.max_bytes} bytes")
    with refusing_bad_files():
        try:
            image = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
        except Image.UnidentifiedImageError as exc:
            accepted = ", ".join(ALLOWED_FORMATS)
            raise ImageDecodeError(f"unreadable image: not in an accepted format ({accepted})") from exc
        if max_side is not None:
            image.draft("RGB", (max_side, max_side))  # JPEG only; other formats ignore it
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageDecodeError(f"image has {width}x{height} pixels, more than the limit of {limits.max_pixels}")
        if min(width, height) < limits.min_side:
            raise ImageDecodeError(f"image {width}x{height} is smaller than {limits.min_side} pixels a side")
        if max(width, height) / min(width, height) > limits.max_aspect_ratio:
            raise ImageDecodeError(f"aspect ratio of {width}x{height} exceeds {limits.max_aspect_ratio}")
        image.seek(0)  # first frame of animations
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image) or image)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to `size`², the shape of subnet-34 challenges."""
    return ImageOps.fit(to_rgb(image), (size, size), method=Image.Resampling.LANCZOS)


def encode_image(
    image: Image.Image | np.ndarray,
    size: int | None = 256,
    quality: int = 75,
    fmt: str = "JPEG",
) -> str:
    """Encode an image as a base64 string for a challenge; `size=None` keeps the original size."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    image = fit_square(image, size) if size else to_rgb(image)
    buffer = io.BytesIO()
    if fmt.upper() == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=fmt.upper())
    return base64.b64encode(buffer.getvalue()).decode("ascii")
