"""Image codec with hard limits: every payload a miner receives goes through `decode_image`.

All failures raise `ImageDecodeError` so callers handle one exception type.
"""

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DecodeLimits",
    "ImageDecodeError",
    "decode_bytes",
    "decode_image",
    "encode_image",
    "fit_square",
    "to_rgb",
]

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})


class ImageDecodeError(ValueError):
    """The payload is not an acceptable image; the message says why."""


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_aspect_ratio: float = 20.0
    min_side: int = 8


def _b64decode(payload: str | bytes, max_bytes: int) -> bytes:
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
    return decode_bytes(_b64decode(payload, limits.max_bytes), limits)


def decode_bytes(raw: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode an encoded image file (JPEG, PNG, ...) into a fully loaded RGB PIL image, enforcing `limits`."""
    if not raw:
        raise ImageDecodeError("empty payload")
    if len(raw) > limits.max_bytes:
        raise ImageDecodeError(f"payload larger than {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(raw))
            except Image.UnidentifiedImageError as exc:
                raise ImageDecodeError("unreadable image: not a known image format") from exc
            fmt = image.format
            if fmt not in ALLOWED_FORMATS:
                raise ImageDecodeError(f"unsupported image format {fmt!r}")
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageDecodeError(
                    f"image has {width}x{height} pixels, more than the limit of {limits.max_pixels}"
                )
            if min(width, height) < limits.min_side:
                raise ImageDecodeError(f"image {width}x{height} is smaller than {limits.min_side} pixels a side")
            if max(width, height) / min(width, height) > limits.max_aspect_ratio:
                raise ImageDecodeError(
                    f"aspect ratio of {width}x{height} exceeds {limits.max_aspect_ratio}"
                )
            image.seek(0)  # first frame of animations
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return to_rgb(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, MemoryError) as exc:
        raise ImageDecodeError(f"unreadable or truncated image: {exc}") from exc


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
