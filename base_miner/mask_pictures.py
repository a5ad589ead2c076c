"""Pictures of a generated-pixel map for people: the map itself as grayscale PNG and an overlay on the image.

The map PNG is `bitmind.mask_codec`'s format (8-bit, p × 255), so a written map can be read back as a mask; the
overlay tints each pixel red in proportion to its probability, so a marked region is seen in its context.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from bitmind.atomic import atomic_write_bytes
from bitmind.image_codec import to_rgb
from bitmind.mask_codec import mask_to_png

__all__ = ["overlay", "write_mask_pictures"]

TINT = np.array([255.0, 0.0, 0.0], dtype=np.float32)
MAX_ALPHA = 0.6  # a certain pixel is 60 % red: the content stays recognisable under the tint


def overlay(image: Image.Image, prob_map: np.ndarray) -> Image.Image:
    """`image` (RGB) with red blended in by `prob_map` ([H, W] in [0, 1], resized to the image when it differs)."""
    image = to_rgb(image)
    probabilities = np.clip(np.nan_to_num(np.asarray(prob_map, dtype=np.float32)), 0.0, 1.0)
    if probabilities.shape != (image.height, image.width):
        resized = Image.fromarray(probabilities, mode="F").resize(image.size, Image.Resampling.BILINEAR)
        probabilities = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    alpha = MAX_ALPHA * probabilities[..., None]
    pixels = np.asarray(image, dtype=np.float32) * (1.0 - alpha) + TINT * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def write_mask_pictures(image: Image.Image, prob_map: np.ndarray, map_path: str | Path) -> tuple[Path, Path]:
    """Write the map to `map_path` and the overlay beside it (`<stem>_overlay.png`); returns both paths."""
    map_path = Path(map_path)
    overlay_path = map_path.with_name(f"{map_path.stem}_overlay.png")
    atomic_write_bytes(map_path, mask_to_png(np.clip(np.nan_to_num(np.asarray(prob_map, np.float32)), 0.0, 1.0)))
    picture = overlay(image, prob_map)
    atomic_write_bytes(overlay_path, lambda handle: picture.save(handle, format="PNG"))
    return map_path, overlay_path
