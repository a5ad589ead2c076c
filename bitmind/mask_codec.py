"""Per-pixel "generated" masks as they travel: 8-bit grayscale PNG, base64 on the wire, PNG files in the cache.

One format for every mask in the project: the miner's optional answer (`ImageSynapse.mask`), the validator's
ground truth beside a semi-synthetic cache item, and training masks. A probability in [0, 1] is stored as
round(p * 255), so any decoded mask is in [0, 1] by construction.

Decoding goes through the image codec's hardened path (`decode_base64`, `decode_bytes`: byte cap, header checks
before any pixel is decoded) with limits sized for the expected mask, and then insists on a PNG of mode L or 1
(so 16-bit or float images, whose values could lie outside [0, 1], are refused) of exactly the expected size.
`decode_mask` turns every refusal into None ("no mask"), which is what a validator scoring miners wants.
"""

import base64
import io
import logging

import numpy as np
from PIL import Image

from bitmind.image_codec import DecodeLimits, ImageDecodeError, decode_base64, decode_bytes, refusing_bad_files

__all__ = [
    "MAX_MASK_BYTES",
    "MaskDecodeError",
    "decode_mask",
    "encode_mask",
    "mask_from_png",
    "mask_to_png",
]

log = logging.getLogger(__name__)

# A 256² mask of pure noise compresses to ~66 KB of PNG; real masks are a few KB. Anything larger is refused
# before it is decoded (base64 adds a third on the wire).
MAX_MASK_BYTES = 256 * 1024
MASK_MODES = ("L", "1")


class MaskDecodeError(ImageDecodeError):
    """The payload is not an acceptable mask; the message says why."""


def _as_probability_map(prob_map: np.ndarray) -> np.ndarray:
    array = np.asarray(prob_map)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"a mask is a 2-D array [H, W], got shape {array.shape}")
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"a mask holds numbers, got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError("mask holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"mask values must lie in [0, 1], got [{low:.4g}, {high:.4g}]")
    return array


def mask_to_png(prob_map: np.ndarray) -> bytes:
    """PNG bytes (8-bit grayscale) of a [H, W] probability map in [0, 1]; ValueError for anything else."""
    array = _as_probability_map(prob_map)
    buffer = io.BytesIO()
    # zlib level 1: a 256² map in ~2.5 ms instead of ~12 ms at the default level, ~15 % more bytes (far below the cap).
    Image.fromarray(np.rint(array * 255.0).astype(np.uint8), mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_mask(prob_map: np.ndarray) -> str:
    """Base64 PNG of a [H, W] probability map in [0, 1], ready for `ImageSynapse.mask`.

    ValueError when the map is not 2-D, not finite, outside [0, 1] or encodes to more than MAX_MASK_BYTES (a miner
    bug is reported at the miner, not discovered as "no mask" at every validator).
    """
    raw = mask_to_png(prob_map)
    if len(raw) > MAX_MASK_BYTES:
        raise ValueError(f"encoded mask is {len(raw)} bytes, more than the limit of {MAX_MASK_BYTES}")
    return base64.b64encode(raw).decode("ascii")


def mask_from_png(raw: bytes, expected_size: tuple[int, int], max_bytes: int = MAX_MASK_BYTES) -> np.ndarray:
    """A float32 [H, W] map in [0, 1] from PNG bytes that must be exactly `expected_size` = (height, width).

    Raises MaskDecodeError for anything else: too many bytes, not a PNG, a mode other than 8/1-bit grayscale,
    the wrong size (refused from the header when it has more pixels than expected), a truncated file.
    """
    height, width = (int(side) for side in expected_size)
    if height < 1 or width < 1:
        raise ValueError(f"expected mask size must be positive (height, width), got {expected_size}")
    try:
        with refusing_bad_files(), Image.open(io.BytesIO(raw), formats=("PNG",)) as header:  # reads the header only
            mode, size = header.mode, header.size
    except ImageDecodeError as exc:
        raise MaskDecodeError(f"mask is not a PNG: {exc}") from exc
    if mode not in MASK_MODES:
        raise MaskDecodeError(f"mask PNG has mode {mode}; expected 8-bit grayscale (L) or 1-bit")
    if size != (width, height):
        raise MaskDecodeError(f"mask is {size[0]}x{size[1]}, expected {width}x{height}")
    limits = DecodeLimits(max_bytes=max_bytes, max_pixels=width * height, max_aspect_ratio=np.inf, min_side=1)
    try:
        image = decode_bytes(raw, limits)
    except ImageDecodeError as exc:
        raise MaskDecodeError(f"unreadable mask: {exc}") from exc
    return np.asarray(image, dtype=np.float32)[:, :, 0] / 255.0


def decode_mask(payload: str, expected_size: tuple[int, int]) -> np.ndarray | None:
    """A miner's mask as a float32 [H, W] map in [0, 1], or None ("no mask") when it is missing or refused.

    `expected_size` is (height, width) of the challenge image the miner was sent. Never raises on bad payloads:
    wrong size, undecodable, oversized and non-grayscale masks all come back as None (the reason logged at DEBUG).
    """
    if not payload or not isinstance(payload, (str, bytes)):
        return None
    try:
        return mask_from_png(decode_base64(payload, MAX_MASK_BYTES), expected_size)
    except ImageDecodeError as exc:  # MaskDecodeError included
        log.debug("mask refused: %s", exc)
        return None
