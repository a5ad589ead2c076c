"""Segmenter: which pixels of an image are generated — a per-pixel probability map, and the image's probability
read from it.

Why a map: a real photo with one inpainted region is mostly real, and a whole-image classifier averages the
region away; a map marks the region and its most suspicious pixels decide the image. The encoder is the
packaged ImageNet EfficientNet-Lite0 (frozen, as for the probe: a few thousand training images teach a full
network topics, not traces), read at strides 4, 8 and 16; a light top-down decoder (1×1 laterals, two 3×3
convolutions at stride 8, where they cost a quarter of what they would at stride 4, then the stride-4 lateral
added back for edges) predicts a logit per stride-4 cell, up-sampled to the image. The image logit is the mean of the
top `topk_fraction` cell logits, scaled and shifted by two learnt numbers, so "one suspicious region" is enough
and a clean image stays low.

Preprocessing resizes the whole image to `image_size`² (aspect not kept) instead of cropping: the map must cover
every pixel the validator scores, and the map is resized back to the image's own size.
"""

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from base_miner.checkpoint import WeightsError
from base_miner.detectors.base import Prediction
from base_miner.detectors.folding import FoldedInference
from base_miner.detectors.generalist import efficientnet_pytorch_to_timm, load_package_state_dict
from base_miner.detectors.torch_detector import TorchDetector, TorchSettings
from base_miner.registry import ConfigError, register_detector
from bitmind.image_codec import to_rgb

__all__ = ["SegmenterDetector", "SegmenterNet", "SegmenterSettings", "resize_map"]

log = logging.getLogger(__name__)


def resize_map(probabilities: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float32 map in [0, 1] resized (bilinear) to `size` = (width, height)."""
    image = Image.fromarray(np.asarray(probabilities, dtype=np.float32), mode="F")
    if image.size != tuple(size):
        image = image.resize(tuple(size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def _conv_bn_relu(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True)
    )


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class SegmenterNet(FoldedInference):
    """Frozen EfficientNet stem + first `stages` stages → top-down decoder → stride-4 logit map → image logit."""

    def __init__(self, backbone: nn.Module, stages: int = 4, width: int = 32, topk_fraction: float = 0.05,
                 trainable_stages: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.stem = nn.Sequential(backbone.conv_stem, backbone.bn1)
        self.stages = nn.ModuleList(list(backbone.blocks)[:stages])
        self.frozen = stages - trainable_stages
        self.topk_fraction = topk_fraction
        with torch.no_grad():
            features = self.encode(torch.zeros(1, 3, 64, 64))
        channels = [f.shape[1] for f in features]
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.fuse = nn.Sequential(_conv_bn_relu(width, width), _conv_bn_relu(width, width))
        self.classifier = nn.Conv2d(width, 1, 1)
        self.image_scale = nn.Parameter(torch.ones(1))
        self.image_bias = nn.Parameter(torch.zeros(1))
        for module in (self.stem, *self.stages[: self.frozen]):
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "SegmenterNet":
        """Frozen encoder parts keep their ImageNet batch-norm statistics whatever the caller asks."""
        super().train(mode)
        for module in (self.stem, *self.stages[: self.frozen]):
            module.eval()
        return self

    def frozen_part(self) -> nn.Module:
        return nn.Sequential(self.stem, *self.stages[: self.frozen])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features at stride 4 and deeper (one per stage whose stride is >= 4)."""
        stem, stages = self.stem, list(self.stages)
        folded = self.folded()
        if folded is not None:  # the frozen stem and stages, folded (`fold_for_inference`)
            stem, stages = folded[0], [*folded[1:], *stages[self.frozen :]]
            x = x.contiguous(memory_format=torch.channels_last)
        taps = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.frozen == 0):
            x = stem(x)
        for index, stage in enumerate(stages):
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= self.frozen):
                x = stage(x)
            if index >= 1:  # stage 0 runs at stride 2: too fine and too shallow to pay its decoding cost
                taps.append(x)
        return taps

    def map_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H/4, W/4) logits that a cell is generated."""
        return self.decode(self.encode(x))

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Map logits from `encode`'s features (split so a frozen encoder's features can be computed once)."""
        y = self.lateral[-1](features[-1])
        for lateral, feature in zip(reversed(self.lateral[1:-1]), reversed(features[1:-1])):
            y = _upsample(y, feature) + lateral(feature)
        y = _upsample(self.fuse(y), features[0]) + self.lateral[0](features[0])
        return self.classifier(F.relu(y))

    def image_logits(self, maps: torch.Tensor) -> torch.Tensor:
        """(N,) image logits: the mean of the top cells, through a learnt affine map."""
        flat = maps.flatten(1)
        k = max(1, math.ceil(self.topk_fraction * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(1) * self.image_scale + self.image_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_logits(self.map_logits(x))


class SegmenterSettings(TorchSettings):
    backbone: Literal["tf_efficientnet_lite0"] = "tf_efficientnet_lite0"
    image_size: int = Field(128, ge=32, le=2048, description="side of the square the whole image is resized to")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pretrained: bool = Field(True, description="start from the package's ImageNet backbone when weights is null")
    stages: int = Field(4, ge=3, le=7, description="encoder stages read (4 = down to stride 16)")
    trainable_stages: int = Field(0, ge=0, le=7, description="last encoder stages trained with the decoder")
    width: int = Field(16, ge=4, le=256, description="decoder channels")
    topk_fraction: float = Field(0.05, gt=0.0, le=1.0, description="share of map cells averaged into the image logit")
    mask_weight: float = Field(1.0, ge=0.0, description="weight of the per-pixel BCE in the training loss")
    dice_weight: float = Field(0.5, ge=0.0, description="weight of the soft-Dice term (images with a region only)")
    image_weight: float = Field(1.0, ge=0.0, description="weight of the image-level BCE")


@register_detector("segmenter")
class SegmenterDetector(TorchDetector):
    """Generated-pixel map from a frozen EfficientNet-Lite0 encoder and a light decoder; image probability on top."""

    settings_model = SegmenterSettings
    produces_masks = True

    def build_model(self) -> nn.Module:
        settings = self.settings
        if settings.trainable_stages > settings.stages:
            raise ConfigError(f"{self.name}: trainable_stages {settings.trainable_stages} > stages {settings.stages}")
        backbone = timm.create_model(settings.backbone, pretrained=False, num_classes=0)
        return SegmenterNet(backbone, settings.stages, settings.width, settings.topk_fraction, settings.trainable_stages)

    def load_pretrained(self) -> None:
        """The packaged ImageNet weights into the encoder; the decoder stays randomly initialised."""
        if not self.settings.pretrained:
            return
        backbone = timm.create_model(self.settings.backbone, pretrained=False, num_classes=0)
        weights = {k: v for k, v in load_package_state_dict().items() if not k.startswith("_fc.")}
        result = backbone.load_state_dict(efficientnet_pytorch_to_timm(weights, backbone), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(f"{self.name}: ImageNet backbone did not load fully: {result}")
        self.model.stem.load_state_dict(nn.Sequential(backbone.conv_stem, backbone.bn1).state_dict())
        for stage, source in zip(self.model.stages, backbone.blocks):
            stage.load_state_dict(source.state_dict())
        log.info("%s: loaded the ImageNet %s encoder (%d stages)", self.name, self.settings.backbone, len(self.model.stages))

    # --- preprocessing and inference ---------------------------------------------------------------------------
    def fit_pair(self, image: Image.Image) -> Image.Image:
        """The whole image resized to `image_size`² (what the model sees; the map covers every pixel)."""
        size = self.settings.image_size
        image = to_rgb(image)
        return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)

    def transform(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"{self.name} expects PIL images, got {type(image).__name__}")
        if min(image.size) < 1:
            raise ValueError(f"image {image.size[0]}x{image.size[1]} has no pixels")
        return (pil_to_tensor(self.fit_pair(image)).float().div_(255.0) - self._mean) / self._std

    def predict_detailed(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Image probabilities with each image's generated-pixel map (float32, the image's own size) in `mask`."""
        images = list(images)
        predictions: list[Prediction] = []
        for start in range(0, len(images), self.settings.batch_size):
            chunk = images[start : start + self.settings.batch_size]
            batch = torch.stack([self.transform(image) for image in chunk]).to(self.torch_device)
            with torch.inference_mode(), self._autocast():
                maps = self.model.map_logits(batch).float()
                logits = self.model.image_logits(maps).float()
            probabilities = torch.sigmoid(logits).nan_to_num(0.5).clamp(0.0, 1.0).cpu().tolist()
            cells = torch.sigmoid(maps[:, 0]).nan_to_num(0.0).cpu().numpy()
            for image, probability, cell in zip(chunk, probabilities, cells):
                predictions.append(Prediction(probability, route=self.name, experts={self.name: probability},
                                              mask=resize_map(cell, image.size)))  # fmt: skip
        return predictions

    # --- training ----------------------------------------------------------------------------------------------
    def training_loss(self, batch: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None = None,
                      **extras: Any) -> torch.Tensor:  # fmt: skip
        """Image BCE + per-pixel BCE + soft Dice. `masks` (N, H, W) in [0, 1] at the batch's size; without them,
        each image's mask is its label everywhere (real: nothing generated, whole fake: everything)."""
        return self.map_loss(self.model.map_logits(batch), labels, masks)

    def map_loss(self, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """`training_loss` from map logits (N, 1, h, w); `masks` (N, H, W) are pooled to the map's grid."""
        settings = self.settings
        labels = labels.to(maps.device).float().view(-1)
        if masks is None:
            target = labels.view(-1, 1, 1, 1).expand(-1, 1, *maps.shape[-2:])
        else:
            target = F.adaptive_avg_pool2d(masks.to(maps.device).float().unsqueeze(1), maps.shape[-2:])
        image = F.binary_cross_entropy_with_logits(self.model.image_logits(maps), labels)
        pixel = F.binary_cross_entropy_with_logits(maps, target)
        probabilities = torch.sigmoid(maps).flatten(1)
        flat = target.flatten(1)
        with_region = flat.sum(1) > 0
        dice = maps.new_zeros(())
        if with_region.any():
            overlap = (probabilities * flat).sum(1)[with_region]
            total = (probabilities.sum(1) + flat.sum(1))[with_region]
            dice = (1.0 - (2.0 * overlap + 1.0) / (total + 1.0)).mean()
        loss = settings.image_weight * image + settings.mask_weight * pixel + settings.dice_weight * dice
        self.last_loss_terms = {"image": float(image.detach()), "pixel": float(pixel.detach()), "dice": float(dice.detach())}
        return loss
