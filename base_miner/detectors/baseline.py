"""A deliberately poor detector for the local demo: a constant answer, or seeded random guesses.

It shows what a miner without a model scores (MCC ≈ 0), next to which a trained detector must stand out. No
torch model, no weights, instant start-up.
"""

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from base_miner.detectors.base import DeepfakeDetector, Prediction
from base_miner.detectors.torch_detector import parse_settings
from base_miner.registry import register_detector

__all__ = ["BaselineDetector", "BaselineSettings"]


class BaselineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    detector: str
    name: str | None = None
    mode: Literal["constant", "random"] = "constant"
    value: float = Field(0.5, ge=0.0, le=1.0, description="the answer in constant mode")
    seed: int = Field(0, ge=0, description="seed of the random mode's generator")
    config_dir: str | None = None
    device: str | None = None


@register_detector("baseline")
class BaselineDetector(DeepfakeDetector):
    """`mode: constant` answers `value` for every image; `mode: random` draws uniform guesses from `seed`."""

    def __init__(self, config: dict[str, Any], device: str | None = None) -> None:
        super().__init__(config, device="cpu")
        self.settings = parse_settings(BaselineSettings, self.config)
        self._rng = np.random.default_rng(self.settings.seed)

    def predict_detailed(self, images: Sequence[Image.Image]) -> list[Prediction]:
        count = len(images)
        if self.settings.mode == "random":
            values = self._rng.random(count).tolist()
        else:
            values = [self.settings.value] * count
        return [Prediction(v, route=self.name, experts={self.name: v}) for v in values]
