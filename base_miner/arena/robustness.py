"""Robustness sweeps: the same images degraded step by step (JPEG quality, Gaussian blur, down-then-up scaling,
centre crop), so a detector's metrics can be plotted against the strength of each everyday transformation.
`sn34_chain` is subnet 34's benchmark degradation chain (`base_miner.export.bench.degrade`): level 1 is the image
its robustness pass scores, and the arena blends that pass into the sn34 score.

Level 0 of every sweep is the untouched image, so each curve starts from the clean score.
"""

import io
from collections.abc import Callable

from PIL import Image, ImageFilter

from base_miner.export.bench import degrade

__all__ = ["SWEEPS", "Sweep", "perturb"]


def _jpeg(image: Image.Image, quality: float) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _blur(image: Image.Image, sigma: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(sigma)) if sigma > 0 else image


def _rescale(image: Image.Image, factor: float) -> Image.Image:
    """Down-scale by `factor` (bilinear) and back up to the original size (bicubic), as re-posted images are."""
    if factor >= 1.0:
        return image
    width, height = image.size
    small = image.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.BILINEAR)
    return small.resize((width, height), Image.Resampling.BICUBIC)


def _crop(image: Image.Image, fraction: float) -> Image.Image:
    """Keep the central `fraction` of each side, without resampling."""
    if fraction >= 1.0:
        return image
    width, height = image.size
    new_w, new_h = max(2, round(width * fraction)), max(2, round(height * fraction))
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return image.crop((left, top, left + new_w, top + new_h))


def _sn34_chain(image: Image.Image, level: float) -> Image.Image:
    return degrade(image) if level else image


class Sweep:
    """A named transformation and the levels it is applied at (first level = clean)."""

    def __init__(self, name: str, label: str, levels: tuple[float, ...], apply: Callable[[Image.Image, float], Image.Image]):
        self.name, self.label, self.levels, self.apply = name, label, levels, apply


SWEEPS: dict[str, Sweep] = {
    sweep.name: sweep
    for sweep in (
        Sweep("jpeg", "JPEG quality", (100, 90, 80, 70, 60, 50, 40, 30), _jpeg),
        Sweep("blur", "Gaussian blur sigma (px)", (0.0, 0.5, 1.0, 1.5, 2.0, 3.0), _blur),
        Sweep("rescale", "down-up scale factor", (1.0, 0.9, 0.75, 0.5, 0.25), _rescale),
        Sweep("crop", "centre crop (side fraction)", (1.0, 0.9, 0.75, 0.5), _crop),
        Sweep("sn34_chain", "sn34 degradation chain (0 clean, 1 degraded)", (0, 1), _sn34_chain),
    )
}


def perturb(image: Image.Image, sweep: str, level: float) -> Image.Image:
    """`image` transformed by sweep `sweep` at `level`."""
    if sweep not in SWEEPS:
        raise ValueError(f"unknown robustness sweep {sweep!r}; choose from {list(SWEEPS)}")
    return SWEEPS[sweep].apply(image.convert("RGB"), level)
