"""Training samples for detectors that learn a generated-pixel map: the image and its mask transformed together.

A detector opts in by accepting `masks` in `training_loss`. Its rows then keep their `mask` column (a PNG, the
format of `bitmind.mask_codec`); rows of a dataset without masks get their label everywhere (a real image has no
generated pixel, a whole fake is generated throughout). Geometry (mirror, crop, resize) is applied to image and
mask alike; only photometric operations (JPEG, blur) of the trainer's augmentation touch the image alone, since
any other would move pixels away from their mask.
"""

import inspect
from collections.abc import Sequence

import numpy as np
from PIL import Image

from base_miner.training.augment import TrainAugment
from bitmind.image_codec import to_rgb
from bitmind.mask_codec import mask_from_png

__all__ = ["MASK_COLUMN", "PHOTOMETRIC", "PairedAugment", "accepts_masks", "align_mask_columns", "row_mask"]

MASK_COLUMN = "mask"
PHOTOMETRIC = ("jpeg", "blur")
MIN_CROP_AREA = 0.6  # a crop keeps 60-100 % of the image, so a 5 % region usually survives


def accepts_masks(detector) -> bool:
    """Whether `detector.training_loss` takes a `masks` argument."""
    return "masks" in inspect.signature(detector.training_loss).parameters


def align_mask_columns(parts: Sequence) -> list:
    """Datasets to concatenate: when any has a `mask` column, the others get an empty one of the same type."""
    from datasets import Image as ImageFeature

    if not any(MASK_COLUMN in part.column_names for part in parts):
        return list(parts)
    return [
        part if MASK_COLUMN in part.column_names
        else part.add_column(MASK_COLUMN, [None] * len(part)).cast_column(MASK_COLUMN, ImageFeature(decode=False))
        for part in parts
    ]  # fmt: skip


def row_mask(cell: dict | None, size: tuple[int, int], label: int) -> np.ndarray:
    """The float32 [H, W] mask of a row whose image is `size` = (width, height); its label everywhere when the row
    has none. A mask of another size or an unreadable one raises `bitmind.mask_codec.MaskDecodeError`."""
    width, height = size
    if not cell or not cell.get("bytes"):
        return np.full((height, width), float(label), dtype=np.float32)
    return mask_from_png(cell["bytes"], (height, width), max_bytes=len(cell["bytes"]))


class PairedAugment:
    """`augment(image, mask, size, rng)` → (RGB `size`² image, float32 `size`² mask), deterministic given `rng`."""

    def __init__(self, strength: float = 0.5, ops: Sequence[str] | None = None) -> None:
        photometric = [op for op in (PHOTOMETRIC if ops is None else ops) if op in PHOTOMETRIC]
        self.strength = float(strength)
        self.photometric = TrainAugment(strength, photometric) if photometric else None
        self.flip = ops is None or "hflip" in ops
        self.crop = ops is None or "crop" in ops

    def __call__(self, image: Image.Image, mask: np.ndarray, size: int, rng: np.random.Generator):
        image = to_rgb(image)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask {mask.shape[::-1]} does not match image {image.size}")
        if self.flip and rng.random() < self.strength:
            image, mask = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask[:, ::-1]
        if self.crop and rng.random() < self.strength:
            side = float(np.sqrt(rng.uniform(MIN_CROP_AREA, 1.0)))
            w, h = max(1, round(image.width * side)), max(1, round(image.height * side))
            left, top = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
            image, mask = image.crop((left, top, left + w, top + h)), mask[top : top + h, left : left + w]
        if self.photometric is not None:
            image = self.photometric(image, rng)
        image = image.resize((size, size), Image.Resampling.BICUBIC) if image.size != (size, size) else image
        resized = Image.fromarray(np.ascontiguousarray(mask, dtype=np.float32), mode="F")
        if resized.size != (size, size):
            resized = resized.resize((size, size), Image.Resampling.BILINEAR)
        return image, np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
