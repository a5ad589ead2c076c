"""Geometric verification: do a challenge and one indexed image share many local features under one transform?

Why: the CNN descriptor ranks the right indexed image first for nearly every copy, but its score alone cannot both
accept 90 % of level-1 copies (crop to 20 % area, rotation, flips) and refuse all but 0.1 % of generated images:
the tails overlap. Keypoints that agree on a single transform are what a copy has and a look-alike has not.
Measured on 60 indexed `diverse` photos against 800 generated images: CNN shortlist + at least 15 RANSAC inliers
matched level 0/1/2/3 copies 1.00/0.93/0.95/0.88 with no generated image matched.

ORB (OpenCV): rotation- and scale-invariant binary features, fast on CPU. A left-right mirror is matched by
extracting the challenge's features a second time from its mirror image (an upside-down flip is a mirror plus a
180° rotation, which ORB handles).
"""

import cv2
import numpy as np
from PIL import Image

from bitmind.image_codec import to_rgb

__all__ = ["KEYPOINTS", "LOCAL_IDENTITY", "LocalFeatures", "count_inliers", "local_features", "mirrored"]

KEYPOINTS = 500
REFERENCE_SIDE = (256, 384)  # indexed images are resized so their long side lies in this range (challenges: 256²)
RATIO = 0.8  # Lowe's ratio test on Hamming distances
RANSAC_PIXELS = 5.0
LOCAL_IDENTITY = {"features": "orb", "keypoints": KEYPOINTS, "reference_side": list(REFERENCE_SIDE), "ratio": RATIO,
                  "model": "similarity", "ransac_pixels": RANSAC_PIXELS}  # fmt: skip

# (points (n, 2) float32, descriptors (n, 32) uint8)
LocalFeatures = tuple[np.ndarray, np.ndarray]

_ORB = dict(nfeatures=KEYPOINTS, scaleFactor=1.2, nlevels=8, edgeThreshold=15, patchSize=31, fastThreshold=10)


def _grey(image: Image.Image, side_range: tuple[int, int]) -> np.ndarray:
    grey = np.asarray(to_rgb(image).convert("L"))
    low, high = side_range
    long_side = max(grey.shape)
    scale = high / long_side if long_side > high else low / long_side if long_side < low else 1.0
    if scale != 1.0:
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return grey


def local_features(image: Image.Image, side_range: tuple[int, int] = REFERENCE_SIDE) -> LocalFeatures:
    """At most KEYPOINTS ORB keypoints of `image` (resized so its long side lies in `side_range`)."""
    keypoints, descriptors = cv2.ORB_create(**_ORB).detectAndCompute(_grey(image, side_range), None)
    if descriptors is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    return np.float32([k.pt for k in keypoints]), descriptors


def mirrored(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def count_inliers(query: LocalFeatures, reference: LocalFeatures) -> int:
    """Matches (ratio test) consistent with one similarity transform (rotation, scale, shift) from query to reference
    (RANSAC; a full affine map measured no better); 0 when too few."""
    (query_points, query_desc), (ref_points, ref_desc) = query, reference
    if len(query_desc) < 3 or len(ref_desc) < 3:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(query_desc, ref_desc, k=2)
    good = [best for best, second in (p for p in pairs if len(p) == 2) if best.distance < RATIO * second.distance]
    if len(good) < 3:
        return 0
    source = query_points[[m.queryIdx for m in good]]
    target = ref_points[[m.trainIdx for m in good]]
    _, mask = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PIXELS)
    return int(mask.sum()) if mask is not None else 0
