"""Geometric verification: do a challenge and one indexed image share many local features under one transform?

Why: the CNN descriptor ranks the right indexed image first for nearly every copy, but its score alone cannot both
accept 90 % of level-1 copies (crop to 20 % area, rotation, flips) and refuse all but 0.1 % of generated images:
the tails overlap. Keypoints that agree on a single transform are what a copy has and a look-alike has not.
Measured on 60 indexed `diverse` photos against 800 generated images: CNN shortlist + at least 15 RANSAC inliers
matched level 0/1/2/3 copies 1.00/0.93/0.95/0.88 with no generated image matched. On 50 CIFAKE 32² thumbnails
indexed among 490 images, FAST threshold 4 instead of 10 gave at least the needed inliers to 80 / 76 / 82 % of level
1/2/3 copies instead of 40 / 48 / 48 %, faces 97 % instead of 93 %, photos unchanged, and generated images shortlisted
against them no more inliers (at most 16, as before).

ORB (OpenCV): rotation- and scale-invariant binary features, fast on CPU. A left-right mirror is matched by
extracting the challenge's features a second time from its mirror image (an upside-down flip is a mirror plus a
180° rotation, which ORB handles).
"""

import math

import cv2
import numpy as np
from PIL import Image

from bitmind.image_codec import to_rgb

__all__ = ["KEYPOINTS", "LOCAL_IDENTITY", "LocalFeatures", "count_inliers", "local_features", "mirrored"]

KEYPOINTS = 500
REFERENCE_SIDE = (256, 384)  # indexed images are resized so their long side lies in this range (challenges: 256²)
RATIO = 0.8  # Lowe's ratio test on Hamming distances
RANSAC_PIXELS = 5.0
# FAST corner threshold: smooth images (32² thumbnails and small face crops up-scaled to 256²) have few corners
# above the usual 10; at 4 they get enough, while ORB still keeps only the KEYPOINTS strongest on detailed photos.
FAST_THRESHOLD = 4
# The transforms a validator's challenge can be (query -> reference): its crops keep at least ~30 % of the side and
# references are resized to REFERENCE_SIDE, so the scale lies within SCALE_RANGE; it rotates by at most 20°, and an
# upside-down flip adds 180° (a mirror is tried separately). Anything else is a chance consensus: on smooth
# thumbnails RANSAC otherwise finds dozens of "inliers" under a transform that shrinks the query to a point.
SCALE_RANGE = (0.2, 2.5)
MAX_TILT_DEG = 30.0  # from 0° or 180°
LOCAL_IDENTITY = {"features": "orb", "keypoints": KEYPOINTS, "reference_side": list(REFERENCE_SIDE), "ratio": RATIO,
                  "model": "similarity", "ransac_pixels": RANSAC_PIXELS, "fast_threshold": FAST_THRESHOLD,
                  "scale_range": list(SCALE_RANGE), "max_tilt_deg": MAX_TILT_DEG}  # fmt: skip

# (points (n, 2) float32, descriptors (n, 32) uint8)
LocalFeatures = tuple[np.ndarray, np.ndarray]

_ORB = dict(nfeatures=KEYPOINTS, scaleFactor=1.2, nlevels=8, edgeThreshold=15, patchSize=31, fastThreshold=FAST_THRESHOLD)


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
    (RANSAC; a full affine map measured no better); 0 when too few or when the transform is not one a validator's
    augmentation produces."""
    (query_points, query_desc), (ref_points, ref_desc) = query, reference
    if len(query_desc) < 3 or len(ref_desc) < 3:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(query_desc, ref_desc, k=2)
    good = [best for best, second in (p for p in pairs if len(p) == 2) if best.distance < RATIO * second.distance]
    if len(good) < 3:
        return 0
    source = query_points[[m.queryIdx for m in good]]
    target = ref_points[[m.trainIdx for m in good]]
    transform, mask = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PIXELS)
    return int(mask.sum()) if transform is not None and _plausible(transform) else 0


def _plausible(transform: np.ndarray) -> bool:
    """Whether a similarity transform (2x3) is one a validator's augmentation can produce (see SCALE_RANGE)."""
    scale = math.hypot(transform[0, 0], transform[1, 0])
    tilt = abs(math.degrees(math.atan2(transform[1, 0], transform[0, 0])))
    return SCALE_RANGE[0] <= scale <= SCALE_RANGE[1] and min(tilt, 180.0 - tilt) <= MAX_TILT_DEG
