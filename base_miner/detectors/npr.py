"""NPR (Tan et al., CVPR 2024): neighbouring-pixel relationships expose the up-sampling step of generators.

`npr(x) = x − up_nearest(down_nearest(x, ½))` — each pixel minus the top-left pixel of its 2×2 block — feeds a
ResNet-50 cut after layer2 with a 3×3 stride-2 stem (≈1.44 M parameters), pooled to one logit. Trained from
scratch. The default preprocessing crops instead of resizing, because resampling would blur the very traces
NPR reads.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1

from base_miner.detectors.torch_detector import TorchDetector, TorchSettings
from base_miner.registry import register_detector

__all__ = ["NPRDetector", "NPRNet", "NPRSettings", "npr"]


def npr(x: torch.Tensor) -> torch.Tensor:
    """Neighbouring pixel relationships of a (N, C, H, W) batch; odd H/W lose their last row/column."""
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    if height == 0 or width == 0:
        raise ValueError(f"NPR needs images of at least 2x2 pixels, got {tuple(x.shape[-2:])}")
    x = x[..., :height, :width]
    coarse = F.interpolate(x, scale_factor=0.5, mode="nearest")
    return x - F.interpolate(coarse, scale_factor=2.0, mode="nearest")


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A ResNet stage of torchvision `Bottleneck`s (projection shortcut on the first block when shapes change)."""
    outplanes = planes * Bottleneck.expansion
    shortcut = None
    if stride != 1 or inplanes != outplanes:
        shortcut = nn.Sequential(conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))
    layers = [Bottleneck(inplanes, planes, stride, shortcut)]
    layers += [Bottleneck(outplanes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class NPRNet(nn.Module):
    """npr → conv3×3/2 → BN → ReLU → maxpool → layer1 (3×64) → layer2 (4×128, /2) → pool → fc 512→1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.layer1 = _stage(64, 64, blocks=3, stride=1)
        self.layer2 = _stage(64 * Bottleneck.expansion, 128, blocks=4, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128 * Bottleneck.expansion, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(npr(x))))
        return self.fc(torch.flatten(self.pool(x), 1)).squeeze(-1)


class NPRSettings(TorchSettings):
    resize_mode: Literal["center_crop", "short_side"] = "center_crop"

    @field_validator("image_size")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("NPR needs an even image_size (it compares 2x2 pixel blocks)")
        return value


@register_detector("NPR")
class NPRDetector(TorchDetector):
    """NPR on `image_size`² crops (ImageNet normalisation), trained from scratch with BCE."""

    settings_model = NPRSettings

    def build_model(self) -> nn.Module:
        return NPRNet()
