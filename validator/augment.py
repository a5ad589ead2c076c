"""Challenge augmentation: four levels of increasing distortion, every challenge ends as a 256² RGB image.

Level 0: random square crop + resize. Level 1: + rotation ±20°, random resized crop (area 0.2–1, aspect
3/4–4/3), horizontal / vertical flips. Level 2: + saturation, contrast, JPEG re-compression. Level 3: + Gaussian
blur and per-channel (colour) Gaussian noise. Distortions are the same for real and fake images, so a miner
cannot read the label from them; they make miners robust to what images go through in the wild, and stop a miner
from answering by looking a public real image up instead of detecting.

All randomness comes from the `numpy.random.Generator` passed in: the same seed and image give the same output.
Rotation, crop, resize and flips are one affine warp (one resampling; the crop stays inside the rotated image, so
there are no black corners), after a fast box-filter reduction when the crop is much larger than the output.
"""

import io
import math
import statistics
from collections.abc import Mapping
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from bitmind.image_codec import to_rgb

__all__ = ["DEFAULT_LEVEL_PROBS", "LEVELS", "Augmenter", "parse_level_probs"]

LEVELS = (0, 1, 2, 3)
# Level 0 is close to the raw public image (a miner could match it against the public real datasets), so it
# gets a small share; it stays in the mix so clean-image accuracy still counts. Heavier levels share the rest.
DEFAULT_LEVEL_PROBS: dict[int, float] = {0: 0.1, 1: 0.3, 2: 0.3, 3: 0.3}

MAX_ROTATION_DEG = 20.0
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
SATURATION = (0.6, 1.4)
CONTRAST = (0.6, 1.4)
JPEG_QUALITY = (40, 90)  # inclusive
BLUR_SIGMA = (0.2, 1.5)
NOISE_SIGMA = (2.0, 8.0)  # on the 0–255 scale


def parse_level_probs(text: str) -> dict[int, float]:
    """Parse `"0:0.1,1:0.3,2:0.3,3:0.3"` (a command-line flag) into a level -> weight dict; ValueError if malformed."""
    probs: dict[int, float] = {}
    for part in text.split(","):
        level, sep, weight = part.strip().partition(":")
        if not sep:
            raise ValueError(f"augmentation level weight {part!r} is not LEVEL:WEIGHT")
        try:
            key, value = int(level), float(weight)
        except ValueError:
            raise ValueError(f"augmentation level weight {part!r} is not LEVEL:WEIGHT") from None
        if key in probs:
            raise ValueError(f"augmentation level {key} given twice")
        probs[key] = value
    return probs


def _validate_level_probs(level_probs: Mapping[int, float]) -> tuple[tuple[int, ...], np.ndarray]:
    if not isinstance(level_probs, Mapping) or not level_probs:
        raise ValueError("level probabilities must be a non-empty mapping of level -> weight")
    levels, weights = [], []
    for level, weight in level_probs.items():
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or int(level) not in LEVELS:
            raise ValueError(f"unknown augmentation level {level!r}; levels are {LEVELS}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)):
            raise ValueError(f"weight of level {level} must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of level {level} must be finite and >= 0, got {weight!r}")
        levels.append(int(level))
        weights.append(float(weight))
    total = sum(weights)
    if total <= 0:
        raise ValueError("augmentation level weights must sum to more than 0")
    return tuple(levels), np.asarray(weights) / total


def _inscribed_size(width: float, height: float, angle_rad: float) -> tuple[float, float]:
    """Largest axis-aligned rectangle inside a width×height rectangle rotated by angle (|angle| < 90°)."""
    sin_a, cos_a = abs(math.sin(angle_rad)), abs(math.cos(angle_rad))
    long_side, short_side = max(width, height), min(width, height)
    if short_side <= 2 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        half = 0.5 * short_side
        return (half / sin_a, half / cos_a) if width >= height else (half / cos_a, half / sin_a)
    cos_2a = cos_a * cos_a - sin_a * sin_a
    return (width * cos_a - height * sin_a) / cos_2a, (height * cos_a - width * sin_a) / cos_2a


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


@cache
def _normal_quantiles() -> np.ndarray:
    """65536 standard-normal quantiles: indexing them with random uint16 draws Gaussian noise ~7x faster than
    `Generator.standard_normal` (the noise is then the dominant cost of level 3)."""
    normal = statistics.NormalDist()
    return np.array([normal.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float32)


def _gaussian_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return _normal_quantiles()[rng.integers(0, 65536, size=shape, dtype=np.uint16)]


class Augmenter:
    """Picks a level from `level_probs` and applies it; `__call__` returns (256² RGB image, description)."""

    def __init__(self, level_probs: Mapping[int, float] | None = None, size: int = 256) -> None:
        self.levels, self.probs = _validate_level_probs(DEFAULT_LEVEL_PROBS if level_probs is None else level_probs)
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"output size must be an integer >= 8, got {size!r}")
        self.size = size

    def __repr__(self) -> str:
        probs = ", ".join(f"{level}: {p:.3g}" for level, p in zip(self.levels, self.probs))
        return f"Augmenter({{{probs}}}, size={self.size})"

    def choose_level(self, rng: np.random.Generator) -> int:
        return int(self.levels[int(rng.choice(len(self.levels), p=self.probs))])

    def __call__(
        self, image: Image.Image, rng: np.random.Generator, level: int | None = None
    ) -> tuple[Image.Image, dict[str, Any]]:
        """Augment `image` at `level` (default: drawn from the level probabilities) with randomness from `rng`.

        The description is JSON-serialisable: `{"level": L, "ops": [{"op": name, ...params}, ...]}`.
        """
        augmented, _, description = self.augment_with_mask(image, None, rng, level)
        return augmented, description

    def augment_with_mask(
        self, image: Image.Image, mask: np.ndarray | None, rng: np.random.Generator, level: int | None = None
    ) -> tuple[Image.Image, np.ndarray | None, dict[str, Any]]:
        """As `__call__`, also moving `mask` (a [H, W] map in [0, 1] of generated pixels) with the image: the crop,
        rotation, flips and resize apply to both, so the mask still marks the same pixels; colour, blur, noise and
        JPEG leave it. The randomness drawn is the same with or without a mask."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
        if level is None:
            level = self.choose_level(rng)
        elif level not in LEVELS:
            raise ValueError(f"unknown augmentation level {level!r}; levels are {LEVELS}")
        image = to_rgb(image)
        mask_image = None
        if mask is not None:
            if np.shape(mask) != (image.height, image.width):
                raise ValueError(f"mask of shape {np.shape(mask)} does not fit a {image.width}x{image.height} image")
            mask_image = Image.fromarray(np.asarray(mask, dtype=np.float32), mode="F")
        ops: list[dict[str, Any]] = []
        if level == 0:
            image, mask_image = self._square_crop(image, mask_image, rng, ops)
        else:
            image, mask_image = self._geometric(image, mask_image, rng, ops)
        if level >= 2:
            image = self._colour(image, rng, ops)
        if level >= 3:
            image = self._blur_and_noise(image, rng, ops)
        if level >= 2:
            image = self._jpeg(image, rng, ops)
        moved = None if mask_image is None else np.clip(np.asarray(mask_image, dtype=np.float32), 0.0, 1.0)
        return image, moved, {"level": int(level), "ops": ops}

    # ------------------------------------------------------------------ level 0
    def _square_crop(
        self, image: Image.Image, mask: Image.Image | None, rng: np.random.Generator, ops: list
    ) -> tuple[Image.Image, Image.Image | None]:
        side = min(image.size)
        left = int(rng.integers(0, image.width - side + 1))
        top = int(rng.integers(0, image.height - side + 1))
        box = (left, top, left + side, top + side)
        ops.append({"op": "crop_resize", "box": list(box), "size": self.size})
        size = (self.size, self.size)
        if mask is not None:
            mask = mask.resize(size, Image.Resampling.BILINEAR, box=box)
        return image.resize(size, Image.Resampling.BICUBIC, box=box, reducing_gap=2.0), mask

    # ------------------------------------------------------------------ level 1
    def _geometric(
        self, image: Image.Image, mask: Image.Image | None, rng: np.random.Generator, ops: list
    ) -> tuple[Image.Image, Image.Image | None]:
        """Rotation, random resized crop inside the rotated image, flips, resize: one affine warp."""
        width, height = image.size
        angle = _uniform(rng, (-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        theta = math.radians(angle)
        valid_w, valid_h = _inscribed_size(width, height, theta)
        crop_w, crop_h, offset_x, offset_y, scale, ratio = self._random_crop(valid_w, valid_h, rng)
        hflip, vflip = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        ops.append({"op": "rotate", "degrees": round(angle, 4)})
        ops.append(
            {
                "op": "random_resized_crop",
                "scale": round(scale, 4),
                "ratio": round(ratio, 4),
                "crop_size": [round(crop_w, 2), round(crop_h, 2)],
            }
        )
        if hflip:
            ops.append({"op": "hflip"})
        if vflip:
            ops.append({"op": "vflip"})

        reduce = max(1, int(min(crop_w, crop_h) // self.size))
        if reduce > 1:
            image = image.reduce(reduce)
            mask = None if mask is None else mask.resize(image.size, Image.Resampling.BOX)
        # Output (x, y) in [0, size]² -> offset (dx, dy) from the image centre in the rotated frame -> source.
        ax = (-1 if hflip else 1) * crop_w / self.size
        ay = (-1 if vflip else 1) * crop_h / self.size
        bx = offset_x - valid_w / 2 + (crop_w if hflip else 0.0)
        by = offset_y - valid_h / 2 + (crop_h if vflip else 0.0)
        cos_t, sin_t = math.cos(theta), math.sin(theta)
        centre_x, centre_y = width / 2, height / 2
        # PIL's rotate(angle) turns content counter-clockwise; a source point is R(-angle) of its output offset.
        coeffs = (
            cos_t * ax,
            -sin_t * ay,
            centre_x + cos_t * bx - sin_t * by,
            sin_t * ax,
            cos_t * ay,
            centre_y + sin_t * bx + cos_t * by,
        )
        coeffs = tuple(c / reduce for c in coeffs)
        size, bilinear = (self.size, self.size), Image.Resampling.BILINEAR
        if mask is not None:
            mask = mask.transform(size, Image.Transform.AFFINE, coeffs, resample=bilinear)
        return image.transform(size, Image.Transform.AFFINE, coeffs, resample=bilinear), mask

    @staticmethod
    def _random_crop(
        valid_w: float, valid_h: float, rng: np.random.Generator
    ) -> tuple[float, float, float, float, float, float]:
        """A crop of area fraction in CROP_SCALE, aspect in CROP_RATIO, inside valid_w×valid_h (torchvision's rule)."""
        area = valid_w * valid_h
        log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
        for _ in range(10):
            scale = _uniform(rng, CROP_SCALE)
            ratio = math.exp(_uniform(rng, log_ratio))
            crop_w, crop_h = math.sqrt(area * scale * ratio), math.sqrt(area * scale / ratio)
            if crop_w <= valid_w and crop_h <= valid_h:
                break
        else:  # very elongated images: the largest crop of clamped aspect, centred
            ratio = min(max(valid_w / valid_h, CROP_RATIO[0]), CROP_RATIO[1])
            crop_w = min(valid_w, valid_h * ratio)
            crop_h = crop_w / ratio
            scale = crop_w * crop_h / area
            return crop_w, crop_h, (valid_w - crop_w) / 2, (valid_h - crop_h) / 2, scale, ratio
        offset_x = _uniform(rng, (0.0, valid_w - crop_w))
        offset_y = _uniform(rng, (0.0, valid_h - crop_h))
        return crop_w, crop_h, offset_x, offset_y, scale, ratio

    # ------------------------------------------------------------------ level 2
    @staticmethod
    def _colour(image: Image.Image, rng: np.random.Generator, ops: list) -> Image.Image:
        saturation, contrast = _uniform(rng, SATURATION), _uniform(rng, CONTRAST)
        ops.append({"op": "saturation", "factor": round(saturation, 4)})
        ops.append({"op": "contrast", "factor": round(contrast, 4)})
        image = ImageEnhance.Color(image).enhance(saturation)
        return ImageEnhance.Contrast(image).enhance(contrast)

    @staticmethod
    def _jpeg(image: Image.Image, rng: np.random.Generator, ops: list) -> Image.Image:
        quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        ops.append({"op": "jpeg", "quality": quality})
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as degraded:
            return degraded.convert("RGB")

    # ------------------------------------------------------------------ level 3
    @staticmethod
    def _blur_and_noise(image: Image.Image, rng: np.random.Generator, ops: list) -> Image.Image:
        blur, noise = _uniform(rng, BLUR_SIGMA), _uniform(rng, NOISE_SIGMA)
        ops.append({"op": "gaussian_blur", "sigma": round(blur, 4)})
        ops.append({"op": "colour_noise", "sigma": round(noise, 4)})
        image = image.filter(ImageFilter.GaussianBlur(radius=blur))
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels + _gaussian_noise(rng, pixels.shape) * noise
        return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
