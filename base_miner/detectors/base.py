"""The `DeepfakeDetector` contract every detector, CAMO included, fulfils."""

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["DeepfakeDetector", "Prediction", "select_device"]


@dataclass
class Prediction:
    """One image's answer: the probability it is AI-generated, how CAMO got there, and (from detectors that
    segment) the per-pixel probability that each pixel is generated, float32 in [0, 1] at the image's size."""

    probability: float
    route: str = ""
    experts: dict[str, float] = field(default_factory=dict)
    mask: np.ndarray | None = None


def select_device(requested: str | None = None) -> str:
    """`requested` when given, else CUDA when present, else CPU."""
    if requested and requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class DeepfakeDetector(abc.ABC):
    """Built from a config dict (YAML keys); answers batches of RGB PIL images with probabilities in [0, 1].

    Subclasses load their weights in `__init__` so that a missing or mismatched checkpoint fails at
    start-up, never at the first request.
    """

    registry_name: str = ""
    produces_masks: bool = False  # True when `predict_detailed` fills `Prediction.mask`

    def __init__(self, config: dict[str, Any], device: str | None = None) -> None:
        self.config = dict(config)
        self.device = select_device(device or self.config.get("device"))

    @classmethod
    def from_config(cls, config: Any, device: str | None = None) -> "DeepfakeDetector":
        from base_miner.registry import build_detector

        return build_detector(config, device=device)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.registry_name)

    @abc.abstractmethod
    def predict_detailed(self, images: list[Image.Image]) -> list[Prediction]:
        """Per-image predictions with route and per-expert outputs."""

    def predict(self, images: list[Image.Image]) -> list[float]:
        """Probabilities in [0, 1] that each image is AI-generated."""
        return [p.probability for p in self.predict_detailed(images)]

    def warm_up(self, images: list[Image.Image]) -> None:
        """Run every path a request can take once, at start-up: first use builds lazy state (an ONNX Runtime export
        of a frozen trunk takes seconds) that must not land inside a validator's timeout."""
        self.predict(images)
