"""What subnet 34's benchmark (gasbench) does to an image before a package's `forward` sees it, reproduced from its
public documentation so that offline numbers are computed on the same inputs.

- `bench_input`: the base pass — centre-crop to the declared aspect ratio, then one bilinear resize (OpenCV
  INTER_LINEAR, no antialiasing) to the declared [H, W]. An image already at the declared size is untouched.
- `degrade`: the robustness pass's chain, applied to the original image before `bench_input` — down-scale by 1/2
  (never below 256 px; INTER_AREA) and back up (INTER_LINEAR), JPEG quality 55, WebP quality 75, JPEG quality 80
  (both JPEGs with 4:2:0 chroma subsampling). Used by the scorer and by `bitmind-arena`'s `sn34_chain` sweep.
"""

import io

import cv2
import numpy as np
from PIL import Image

from bitmind.image_codec import to_rgb

__all__ = ["DEGRADE_MIN_SIDE", "DEGRADE_SCALE", "bench_input", "degrade"]

DEGRADE_SCALE = 0.5
DEGRADE_MIN_SIDE = 256  # the benchmark does not down-scale images to below 256 px (a 256² challenge keeps its size)
_CHAIN = (("JPEG", 55), ("WEBP", 75), ("JPEG", 80))


def bench_input(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The uint8 RGB array [H, W, 3] the benchmark feeds a package declaring `preprocessing.resize: [H, W]`."""
    target_h, target_w = size
    if target_h < 1 or target_w < 1:
        raise ValueError(f"declared size must be positive, got {size}")
    array = np.asarray(to_rgb(image))
    height, width = array.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"image {width}x{height} has no pixels")
    scale = min(height / target_h, width / target_w)
    crop_h, crop_w = min(round(scale * target_h), height), min(round(scale * target_w), width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    array = np.ascontiguousarray(array[top : top + crop_h, left : left + crop_w])
    return cv2.resize(array, (target_w, target_h), interpolation=cv2.INTER_LINEAR)


def _recode(array: np.ndarray, codec: str, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    options = {"subsampling": 2} if codec == "JPEG" else {"method": 4}
    Image.fromarray(array).save(buffer, format=codec, quality=quality, **options)
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return np.asarray(decoded.convert("RGB"))


def degrade(image: Image.Image) -> Image.Image:
    """`image` after the benchmark's robustness chain (same size, RGB)."""
    array = np.asarray(to_rgb(image))
    height, width = array.shape[:2]
    small_h = max(DEGRADE_MIN_SIDE, round(height * DEGRADE_SCALE))
    small_w = max(DEGRADE_MIN_SIDE, round(width * DEGRADE_SCALE))
    if small_h < height and small_w < width:
        array = cv2.resize(array, (small_w, small_h), interpolation=cv2.INTER_AREA)
        array = cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)
    for codec, quality in _CHAIN:
        array = _recode(np.ascontiguousarray(array), codec, quality)
    return Image.fromarray(array)
