"""Training augmentation in the Community Forensics style: each operation is drawn a random number of times
(0, 1 or 2), and all drawn operations are applied in a random order.

`strength` in [0, 1] sets how often operations fire: each one's count is Binomial(2, strength / 2), so 0 leaves
images untouched and 1 applies each operation once on average. Magnitudes are fixed ranges covering what
subnet-34 validators do to challenges (JPEG down to quality 40, resampling with any interpolation, crops,
rotations, blur). This is distinct from `validator.augment`, which builds challenges; training needs more variety,
applied identically to real and fake images so that none of it carries the label.
"""

import io
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np
from PIL import Image, ImageFilter

from bitmind.image_codec import to_rgb

__all__ = ["DEFAULT_OPERATIONS", "OPERATIONS", "OPT_IN_OPERATIONS", "TrainAugment", "check_operations", "parse_operations"]

_INTERPOLATIONS = (
    Image.Resampling.NEAREST,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.LANCZOS,
    Image.Resampling.BOX,
    Image.Resampling.HAMMING,
)
MIN_SIDE = 8  # no operation shrinks an image below this many pixels a side


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(40, 101)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _resize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    scale = float(rng.uniform(0.5, 1.5))
    width, height = image.size
    size = (max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale)))
    return image.resize(size, _INTERPOLATIONS[int(rng.integers(len(_INTERPOLATIONS)))])


def _crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    side = float(np.sqrt(rng.uniform(0.5, 1.0)))  # keep 50-100 % of the area
    new_w, new_h = max(MIN_SIDE, round(width * side)), max(MIN_SIDE, round(height * side))
    if new_w >= width and new_h >= height:
        return image
    left, top = int(rng.integers(0, width - min(new_w, width) + 1)), int(rng.integers(0, height - min(new_h, height) + 1))
    return image.crop((left, top, left + min(new_w, width), top + min(new_h, height)))


def _hflip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _vflip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)


def _rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)


def _shear(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    sx, sy = (float(v) for v in rng.uniform(-0.15, 0.15, size=2))
    width, height = image.size
    # Shear about the centre so the content stays in view.
    matrix = (1.0, sx, -sx * height / 2, sy, 1.0, -sy * width / 2)
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR)


def _pad(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    left, top, right, bottom = (int(v) for v in rng.integers(0, max(1, min(width, height) // 10) + 1, size=4))
    fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
    canvas = Image.new("RGB", (width + left + right, height + top + bottom), fill)
    canvas.paste(image, (left, top))
    return canvas


def _cutout(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    cut_w, cut_h = max(1, int(width * rng.uniform(0.1, 0.3))), max(1, int(height * rng.uniform(0.1, 0.3)))
    left, top = int(rng.integers(0, width - cut_w + 1)), int(rng.integers(0, height - cut_h + 1))
    image = image.copy()
    image.paste(tuple(int(v) for v in rng.integers(0, 256, size=3)), (left, top, left + cut_w, top + cut_h))
    return image


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.1, 1.5))))


def _noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Sensor-like Gaussian noise (sigma 2-10 of 255), half the time the same on all channels (luminance noise)."""
    pixels = np.asarray(image, dtype=np.float32)
    sigma = float(rng.uniform(2.0, 10.0))
    shape = pixels.shape[:2] + (1,) if rng.random() < 0.5 else pixels.shape
    noisy = pixels + rng.normal(0.0, sigma, shape).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def _sharpen(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Unsharp masking, as cameras and editors sharpen photos."""
    radius, percent = float(rng.uniform(0.5, 2.0)), int(rng.integers(50, 200))
    return image.filter(ImageFilter.UnsharpMask(radius=radius, percent=percent, threshold=0))


@cache
def _validator_augmenter():
    from validator.augment import Augmenter  # the validator's own challenge transform, at its default level shares

    return Augmenter()


def _challenge(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The challenge a validator would make of this image (a 256² crop at a random level 0-3), brought back to the
    image's own size as a miner's resize would: an expert for small images learns them as miners receive them."""
    challenge, _ = _validator_augmenter()(image, rng)
    return challenge.resize(image.size, Image.Resampling.BICUBIC)


OPERATIONS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "jpeg": _jpeg,
    "resize": _resize,
    "crop": _crop,
    "hflip": _hflip,
    "vflip": _vflip,
    "rotate": _rotate,
    "shear": _shear,
    "pad": _pad,
    "cutout": _cutout,
    "blur": _blur,
    "noise": _noise,
    "sharpen": _sharpen,
    "challenge": _challenge,
}
# Opt-in: `challenge` brings a large image down to a 256² crop's detail, right only for experts of small images;
# `noise` and `sharpen` are camera traits the probe fitter adds as views of their own (bitmind-fit-probe --views).
OPT_IN_OPERATIONS = ("challenge", "noise", "sharpen")
DEFAULT_OPERATIONS = tuple(name for name in OPERATIONS if name not in OPT_IN_OPERATIONS)


def check_operations(names: Sequence[str]) -> list[str]:
    """`names` as a list, or a ValueError naming those that are not operations."""
    unknown = sorted(set(names) - set(OPERATIONS))
    if unknown:
        raise ValueError(f"augmentation: unknown operation(s) {unknown}; choose from {list(OPERATIONS)}")
    return list(names)


def parse_operations(text: str) -> list[str]:
    """A comma-separated flag value (`--augment-ops`, `--views`) as checked operation names."""
    return check_operations([name.strip() for name in text.split(",") if name.strip()])


class TrainAugment:
    """`augment(image, rng)`: a random multiset of `ops`, applied in random order; deterministic given `rng`."""

    def __init__(self, strength: float = 0.5, ops: Sequence[str] | None = None, max_repeats: int = 2) -> None:
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"augmentation strength must be in [0, 1], got {strength!r}")
        ops = check_operations(DEFAULT_OPERATIONS if ops is None else ops)
        if not 1 <= int(max_repeats) <= 8:
            raise ValueError(f"max_repeats must be in [1, 8], got {max_repeats!r}")
        self.strength = float(strength)
        self.ops = ops
        self.max_repeats = int(max_repeats)

    def plan(self, rng: np.random.Generator) -> list[str]:
        """The operations to apply, in order."""
        if self.strength == 0.0:
            return []
        counts = rng.binomial(self.max_repeats, self.strength / self.max_repeats, size=len(self.ops))
        names = [name for name, count in zip(self.ops, counts) for _ in range(int(count))]
        return [names[i] for i in rng.permutation(len(names))]

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        image = to_rgb(image)
        for name in self.plan(rng):
            image = OPERATIONS[name](image, rng)
        return image
