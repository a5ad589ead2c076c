"""Where-is-it-generated metrics: per-image IoU and pixel F1 of predicted generated-pixel maps against true masks.

Both maps are binarised at 0.5 (`bitmind.protocol.is_generated`, the same rule as the image decision). IoU is
averaged over images whose true region is not empty — an empty truth has no region to overlap, and counting
"predicted nothing, was nothing" as 1 would reward a detector that never marks a pixel; real images are judged
by the image-level metrics and by `false_pixel_rate` here. `semi` figures cover images with a partial region
(some but not all pixels generated), the case only a segmenter can get right.
"""

from collections.abc import Sequence

import numpy as np

from bitmind.protocol import is_generated

__all__ = ["mask_metrics"]


def _binary(mask: np.ndarray) -> np.ndarray:
    array = np.asarray(mask, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"a mask is a 2-D array, got shape {array.shape}")
    return np.asarray(is_generated(np.nan_to_num(array, nan=0.0)), dtype=bool)


def mask_metrics(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> dict[str, float | int | None]:
    """Mean IoU (all images with a region, and the partial ones), pixel precision/recall/F1 over every pixel, and
    the share of pixels marked generated in images that have none. Maps must pair up with equal shapes."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted masks but {len(truth)} true ones")
    ious, semi_ious = [], []
    tp = fp = fn = 0
    clean_marked = clean_pixels = 0
    for pred, true in zip(predicted, truth):
        p, t = _binary(pred), _binary(true)
        if p.shape != t.shape:
            raise ValueError(f"predicted mask {p.shape} and true mask {t.shape} differ in shape")
        overlap, union = int((p & t).sum()), int((p | t).sum())
        tp, fp, fn = tp + overlap, fp + int((p & ~t).sum()), fn + int((~p & t).sum())
        if t.any():
            ious.append(overlap / union)
            if not t.all():
                semi_ious.append(overlap / union)
        else:
            clean_marked, clean_pixels = clean_marked + int(p.sum()), clean_pixels + p.size
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {
        "n": len(truth),
        "n_region": len(ious),
        "n_semi": len(semi_ious),
        "mean_iou": float(np.mean(ious)) if ious else None,
        "mean_iou_semi": float(np.mean(semi_ious)) if semi_ious else None,
        "pixel_precision": precision,
        "pixel_recall": recall,
        "pixel_f1": f1,
        "false_pixel_rate": clean_marked / clean_pixels if clean_pixels else None,
    }
