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
computing the challenge's descriptors a second time, in its mirror image at its mirrored keypoints (an upside-down
flip is a mirror plus a 180° rotation, which ORB handles).

A challenge's keypoints come from it and from its half-size copy (`query_features`). Why: a level-1 crop of 20–30 %
area magnifies its region 2–2.5x, so only ORB's coarsest pyramid levels of the 256² challenge meet the reference's
finest ones, and on an up-scaled thumbnail or a smooth face crop those few keypoints miss the needed count. On
`benchmarks/retrieval.py`'s 490 indexed images, the half-size keypoints raised level-1 recall of thumbnails from
0.80 to 0.89 and of faces from 0.87 to 0.90 (photos 0.94 -> 0.95); look-alike portraits then reach more chance
agreements too, which a wider margin (`calibration.INLIER_MARGIN`) and the check that the challenge lies inside the
image it matches (`INSIDE_TOLERANCE`) keep out.
"""

import math
from collections.abc import Sequence

import cv2
import faiss
import numpy as np
from PIL import Image

from bitmind.image_codec import to_rgb

__all__ = ["KEYPOINTS", "LOCAL_IDENTITY", "LocalFeatures", "count_inliers", "frame_size", "local_features",
           "query_features"]

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
# A challenge is cut from inside its source image (the validator's crops stay inside the rotated image), so the
# query's corners land inside the reference; a look-alike's chance consensus (a generated portrait against an indexed
# face) often puts them far outside. The slack absorbs RANSAC's error when extrapolating to the corners. Measured on
# `benchmarks/retrieval.py` (256² references): with 0.15 of the reference's long side, level-1 recall 0.95 / 0.90 /
# 0.90 (photos / thumbnails / faces) and 2 of 4,066 generated images matched; without the check 0.95 / 0.89 / 0.90
# and 5; with 0.1 (a run before the mirror shortcut of `query_features`), 0.94 / 0.89 / 0.90 and 3.
INSIDE_TOLERANCE = 0.15
QUERY_SCALES = (1.0, 0.5)  # a challenge's keypoints: at its (REFERENCE_SIDE-resized) size and at half that
LOCAL_IDENTITY = {"features": "orb", "keypoints": KEYPOINTS, "reference_side": list(REFERENCE_SIDE), "ratio": RATIO,
                  "model": "similarity", "ransac_pixels": RANSAC_PIXELS, "fast_threshold": FAST_THRESHOLD,
                  "scale_range": list(SCALE_RANGE), "max_tilt_deg": MAX_TILT_DEG,
                  "query_scales": list(QUERY_SCALES), "inside_tolerance": INSIDE_TOLERANCE}  # fmt: skip

# (points (n, 2) float32, descriptors (n, 32) uint8)
LocalFeatures = tuple[np.ndarray, np.ndarray]

_ORB = dict(nfeatures=KEYPOINTS, scaleFactor=1.2, nlevels=8, edgeThreshold=15, patchSize=31, fastThreshold=FAST_THRESHOLD)


def frame_size(size: tuple[int, int], side_range: tuple[int, int] = REFERENCE_SIDE) -> tuple[int, int]:
    """(width, height) an image of `size` is resized to for its keypoints: long side within `side_range`."""
    low, high = side_range
    long_side = max(size)
    scale = high / long_side if long_side > high else low / long_side if long_side < low else 1.0
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))) if scale != 1.0 else tuple(size)


def _grey(image: Image.Image, side_range: tuple[int, int]) -> np.ndarray:
    grey = np.asarray(to_rgb(image).convert("L"))
    size = frame_size((grey.shape[1], grey.shape[0]), side_range)
    if size != (grey.shape[1], grey.shape[0]):
        shrink = size[0] < grey.shape[1]
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return grey


def _orb(grey: np.ndarray) -> LocalFeatures:
    keypoints, descriptors = cv2.ORB_create(**_ORB).detectAndCompute(grey, None)
    if descriptors is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    return np.float32([k.pt for k in keypoints]), descriptors


def local_features(image: Image.Image, side_range: tuple[int, int] = REFERENCE_SIDE) -> LocalFeatures:
    """At most KEYPOINTS ORB keypoints of `image` (resized so its long side lies in `side_range`)."""
    return _orb(_grey(image, side_range))


def _mirror_keypoints(keypoints: Sequence[cv2.KeyPoint], width: int) -> list[cv2.KeyPoint]:
    return [cv2.KeyPoint(width - 1 - k.pt[0], k.pt[1], k.size, (180.0 - k.angle) % 360.0, k.response, k.octave,
                         k.class_id) for k in keypoints]  # fmt: skip


def query_features(image: Image.Image) -> tuple[LocalFeatures, LocalFeatures]:
    """The keypoints of a challenge and of its left-right mirror, each at QUERY_SCALES (see the module docstring):
    at most KEYPOINTS per scale, all in the coordinates of the first scale. The mirror's descriptors are computed at
    the mirrored keypoints: no second detection, a quarter less work per verified challenge, about as many inliers
    (measured on crops of the test photos and thumbnails)."""
    grey = _grey(image, REFERENCE_SIDE)
    orb = cv2.ORB_create(**_ORB)
    found: tuple[list, list] = ([], []), ([], [])
    for scale in QUERY_SCALES:
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        resized = grey if size == (grey.shape[1], grey.shape[0]) else cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        keypoints, descriptors = orb.detectAndCompute(resized, None)
        if descriptors is None:
            continue
        mirror_keypoints, mirror_descriptors = orb.compute(
            np.ascontiguousarray(resized[:, ::-1]), _mirror_keypoints(keypoints, resized.shape[1])
        )
        to_first = np.float32([grey.shape[1] / size[0], grey.shape[0] / size[1]])
        for (points, descs), kps, desc in zip(found, (keypoints, mirror_keypoints), (descriptors, mirror_descriptors)):
            if desc is not None and len(kps):
                points.append(np.float32([k.pt for k in kps]) * to_first)
                descs.append(desc)
    return tuple(
        (np.concatenate(points), np.concatenate(descs)) if descs else (np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))
        for points, descs in found
    )  # fmt: skip


def count_inliers(query: LocalFeatures, reference: LocalFeatures,
                  frames: tuple[tuple[int, int], tuple[int, int]] | None = None) -> int:  # fmt: skip
    """Matches (ratio test) consistent with one similarity transform (rotation, scale, shift) from query to reference
    (RANSAC; a full affine map measured no better); 0 when too few or when the transform is not one a validator's
    augmentation produces. With `frames` ((width, height) of the query's and the reference's keypoint frames, see
    `frame_size`), the transform must also put the whole query inside the reference (see INSIDE_TOLERANCE)."""
    (query_points, query_desc), (ref_points, ref_desc) = query, reference
    if len(query_desc) < 3 or len(ref_desc) < 3:
        return 0
    distances, nearest = _nearest_two(query_desc, ref_desc)
    good = np.flatnonzero(distances[:, 0] < RATIO * distances[:, 1])
    if len(good) < 3:
        return 0
    source = np.ascontiguousarray(query_points[good])
    target = np.ascontiguousarray(ref_points[nearest[good, 0]])
    transform, mask = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PIXELS)
    if transform is None or not _plausible(transform) or (frames is not None and not _inside(transform, *frames)):
        return 0
    return int(mask.sum())


def _nearest_two(query_desc: np.ndarray, ref_desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hamming distances (n, 2) and numbers (n, 2) of each query descriptor's two nearest reference descriptors
    (exact search). faiss's binary index gives what OpenCV's brute-force k-NN matcher gives, as arrays instead of a
    Python object per match: a third of the matcher's time on 500-1,000 descriptors, the verification's largest
    part."""
    index = faiss.IndexBinaryFlat(ref_desc.shape[1] * 8)
    index.add(np.ascontiguousarray(ref_desc, dtype=np.uint8))
    return index.search(np.ascontiguousarray(query_desc, dtype=np.uint8), 2)


def _plausible(transform: np.ndarray) -> bool:
    """Whether a similarity transform (2x3) is one a validator's augmentation can produce (see SCALE_RANGE)."""
    scale = math.hypot(transform[0, 0], transform[1, 0])
    tilt = abs(math.degrees(math.atan2(transform[1, 0], transform[0, 0])))
    return SCALE_RANGE[0] <= scale <= SCALE_RANGE[1] and min(tilt, 180.0 - tilt) <= MAX_TILT_DEG


def _inside(transform: np.ndarray, query_size: tuple[int, int], reference_size: tuple[int, int]) -> bool:
    """Whether the query's corners land within the reference (give or take INSIDE_TOLERANCE of its long side)."""
    width, height = query_size
    corners = np.float64([[0, 0], [width, 0], [0, height], [width, height]]) @ transform[:, :2].T + transform[:, 2]
    slack = INSIDE_TOLERANCE * max(reference_size)
    return bool((corners >= -slack).all() and (corners <= np.float64(reference_size) + slack).all())
