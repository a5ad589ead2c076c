"""Stand-in CAMO experts and the scikit-image test pictures shared by the CAMO and `bitmind-detect` tests.

The stand-in expert answers a configured constant (`value: 0.9`), the mean brightness of each input (`value: mean`,
so outputs identify their image) or of its left half (`value: left`, so a mirror image answers differently), and
records the sizes of every batch it was given.
"""

from typing import Any

import numpy as np
import pytest
from PIL import Image
from skimage import data

from base_miner.detectors.base import DeepfakeDetector, Prediction
from base_miner.registry import register_detector

__all__ = ["STAND_IN", "StandInExpert", "camo_config", "left_brightness", "mean_brightness", "pictures"]

STAND_IN = "camo-test-stand-in"


def mean_brightness(image: Image.Image) -> float:
    return float(np.asarray(image, dtype=np.float64).mean() / 255.0)


def left_brightness(image: Image.Image) -> float:
    return mean_brightness(image.crop((0, 0, image.width // 2, image.height)))


@register_detector(STAND_IN)
class StandInExpert(DeepfakeDetector):
    """A detector with known outputs that logs each `predict` call's batch (as image sizes)."""

    def __init__(self, config: dict[str, Any], device: str | None = None) -> None:
        super().__init__(config, device)
        self.calls: list[list[tuple[int, int]]] = []

    def predict_detailed(self, images: list[Image.Image]) -> list[Prediction]:
        self.calls.append([image.size for image in images])
        value = self.config["value"]
        answer = {"mean": mean_brightness, "left": left_brightness}.get(value, lambda image: float(value))
        return [Prediction(answer(image)) for image in images]


def camo_config(face: Any = 0.9, general: Any = 0.2, **keys: Any) -> dict[str, Any]:
    """An inline CAMO config with the face gate and stand-in experts answering `face` and `general`."""
    config = {
        "detector": "CAMO",
        "gate": {"name": "face"},
        "experts": {
            "face": {"detector": STAND_IN, "value": face},
            "general": {"detector": STAND_IN, "value": general},
        },
    }
    config.update(keys)
    return config


@pytest.fixture(scope="session")
def pictures() -> dict[str, Image.Image]:
    """astronaut (one face, 512²), coffee and chelsea (no human face)."""
    return {name: Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea")}
