"""Face gate: find the largest frontal face and hand CAMO an aligned, fixed-size crop of it.

dlib's HOG frontal-face detector finds faces; the 5-point landmark predictor shipped by the
`face-recognition-models` package aligns the largest one (eyes level, fixed scale) into a square crop, the input
face experts are trained on. An image without a face yields no region, and CAMO sends it to its general expert.

Measured on 2 shared CPU cores (800 images of the 256² `diverse` set): HOG costs ~7.6 ms/image at `upsample: 0`
and ~30 ms at `upsample: 1`, which finds 60 % more faces, all of them 37-80 px wide (HOG's window is 80 px).
The default is 0: the gate must stay well under the ~30 ms/image CAMO budget, and a face under 80 px in a 256²
challenge is a small part of an image the general expert judges anyway.
"""

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import dlib
import numpy as np
from PIL import Image

from base_miner.registry import ConfigError, register_gate

__all__ = ["FaceGate", "default_landmarks_path"]

log = logging.getLogger(__name__)

LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"


def default_landmarks_path() -> Path:
    """The 5-point predictor inside `face_recognition_models`, found without importing the package.

    Importing it fails on current setuptools (its `__init__` imports the removed `pkg_resources`).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the face gate needs the 'face-recognition-models' package (pip install it)")
    return Path(spec.submodule_search_locations[0]) / "models" / LANDMARKS_FILE


def _number(config: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"face gate: {key} must be a number in [{low}, {high}], got {value!r}")
    return value


_PER_THREAD = threading.local()


def _models(landmarks: Path) -> tuple[Any, Any]:
    """This thread's HOG detector and landmark predictor.

    dlib does not promise thread safety for either, and it releases the GIL while it works: one pair per thread lets
    the miner's worker threads detect at once (a shared pair behind a lock made them take turns). Building a pair
    takes ~0.35 s, once per thread.
    """
    models = _PER_THREAD.__dict__.setdefault("models", {})
    if landmarks not in models:
        try:
            predictor = dlib.shape_predictor(str(landmarks))
        except RuntimeError as exc:
            raise ConfigError(f"face gate: {str(landmarks)!r} is not a dlib shape predictor: {exc}") from exc
        models[landmarks] = (dlib.get_frontal_face_detector(), predictor)
    return models[landmarks]


@register_gate("face")
class FaceGate:
    """`route(image) -> [("face", aligned crop)]` for the largest face, `[]` when there is none.

    Config keys (all optional):
      upsample          0 or 1: HOG pyramid up-samplings; 1 finds 40-80 px faces at ~4x the cost (default 0)
      min_face_size     smallest accepted face box side, in pixels of the input image (default 40)
      score_threshold   smallest accepted HOG detection score; dlib's own default is 0 (default 0.0)
      margin            crop side / tight landmark-aligned face side; 1.3 = 15 % context each side (default 1.3)
      crop_size         side of the square crop handed to the face expert (default 256)
      detect_max_side   larger images are shrunk to this side for detection only, bounding its cost (default 1024)
      landmarks         path of a dlib 5-point shape predictor (default: the one in face-recognition-models)
    """

    content_types = ("face",)

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = dict(config or {})
        self.upsample = int(_number(config, "upsample", 0, 0, 1))
        self.min_face_size = _number(config, "min_face_size", 40, 0, 1 << 16)
        self.score_threshold = float(_number(config, "score_threshold", 0.0, -10.0, 10.0))
        self.margin = float(_number(config, "margin", 1.3, 1.0, 4.0))
        self.crop_size = int(_number(config, "crop_size", 256, 16, 4096))
        self.detect_max_side = int(_number(config, "detect_max_side", 1024, 80, 1 << 16))
        landmarks = Path(config.get("landmarks") or default_landmarks_path())
        if not landmarks.is_file():
            raise ConfigError(f"face gate: landmark predictor {str(landmarks)!r} does not exist")
        self.landmarks = landmarks.resolve()
        _models(self.landmarks)  # a bad predictor file fails here, at start-up

    def _largest_face(self, pixels: np.ndarray):
        """The largest accepted detection as a dlib rectangle in `pixels` coordinates, or None."""
        height, width = pixels.shape[:2]
        scale = min(1.0, self.detect_max_side / max(height, width))
        small = pixels
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
        detector, _ = _models(self.landmarks)
        boxes, _, _ = detector.run(small, self.upsample, self.score_threshold)
        # `run` already drops detections scoring under the threshold.
        accepted = [box for box in boxes if min(box.width(), box.height()) / scale >= self.min_face_size]
        if not accepted:
            return None
        box = max(accepted, key=lambda b: b.area())
        return dlib.rectangle(
            round(box.left() / scale), round(box.top() / scale), round(box.right() / scale), round(box.bottom() / scale)
        )

    def route(self, image: Image.Image) -> list[tuple[str, Image.Image]]:
        """Regions of `image` (RGB) by content type: the aligned crop of its largest face, or nothing."""
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        box = self._largest_face(pixels)
        if box is None:
            return []
        _, predictor = _models(self.landmarks)
        shape = predictor(pixels, box)
        # dlib pads each side by `padding` x the tight face side, so the crop side is (1 + 2*padding) x tight.
        chip = dlib.get_face_chip(pixels, shape, size=self.crop_size, padding=(self.margin - 1.0) / 2.0)
        return [("face", Image.fromarray(chip))]
