"""UCF (Yan et al., ICCV 2023): uncover common forgery features by disentangling them from content and from
method-specific traces, so the real/fake decision generalises to unseen generators.

Training uses the whole network: a forgery and a content encoder (timm backbones, Xception by default), 1×1-conv
MLPs splitting forgery features into common and specific parts, a real/fake head on the common part, a method head
on the specific part, and an AdaIN decoder that rebuilds images from content features styled by forgery features.
Inference needs only forgery encoder → common MLP → head, which is what `forward` runs.
"""

import math
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat
from torch import nn

from base_miner.detectors.torch_detector import TorchDetector, TorchSettings
from base_miner.registry import ConfigError, register_detector

__all__ = ["AdaIN", "AdaINDecoder", "UCFDetector", "UCFNet", "UCFSettings", "supervised_contrastive"]


def _encoder(backbone: str, pretrained: bool) -> nn.Module:
    """A timm backbone returning its last feature map (no pooling, no classifier)."""
    return timm.create_model(backbone, pretrained=pretrained, num_classes=0, global_pool="")


def _conv_mlp(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """Per-position MLP over a feature map (1×1 convolutions), so features keep their spatial layout."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 1), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(hidden, out_channels, 1)
    )


def _head(in_features: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Linear(hidden, outputs),
    )


def _pool(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.mean(dim=(-2, -1))


class AdaIN(nn.Module):
    """Adaptive instance norm: normalise each channel, then scale and shift it from a style vector."""

    def __init__(self, channels: int, style_dim: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.affine = nn.Linear(style_dim, 2 * channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.affine(style)[..., None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + gamma) + beta


class _UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, style_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.adain = AdaIN(out_channels, style_dim)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return F.leaky_relu(self.adain(x, style), 0.2)


class AdaINDecoder(nn.Module):
    """Content feature map → image: `stages` ×2 up-samplings, each conditioned on the forgery style by AdaIN."""

    def __init__(self, in_channels: int, style_dim: int, stages: int, min_channels: int = 32) -> None:
        super().__init__()
        floor = min(min_channels, in_channels)
        channels = [max(floor, in_channels >> i) for i in range(stages + 1)]  # halve per stage, down to the floor
        self.blocks = nn.ModuleList(_UpBlock(channels[i], channels[i + 1], style_dim) for i in range(stages))
        self.to_rgb = nn.Sequential(nn.Conv2d(channels[-1], 3, 3, padding=1), nn.Tanh())

    def forward(self, content: torch.Tensor, style: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = content
        for block in self.blocks:
            x = block(x, style)
        image = self.to_rgb(x)
        if image.shape[-2:] != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        return image


def supervised_contrastive(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.): pull same-label features together, push others apart.
    Anchors without a positive in the batch are skipped; a batch without any positive gives 0."""
    z = F.normalize(features.float(), dim=1)
    similarity = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    anchors = positives.any(dim=1)
    if not anchors.any():
        return similarity.sum() * 0.0
    log_prob = similarity.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    positive_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -(positive_log_prob[anchors] / positives.sum(dim=1)[anchors]).mean()


class UCFNet(nn.Module):
    """The full UCF network; `forward` is the inference path (forgery encoder → common MLP → head → logit)."""

    def __init__(
        self, backbone: str, pretrained: bool, feature_dim: int, hidden_dim: int, num_methods: int
    ) -> None:
        super().__init__()
        self.forgery_encoder = _encoder(backbone, pretrained)
        self.content_encoder = _encoder(backbone, pretrained)
        channels = self.forgery_encoder.num_features
        self.common = _conv_mlp(channels, hidden_dim, feature_dim)
        self.specific = _conv_mlp(channels, hidden_dim, feature_dim)
        self.head = _head(feature_dim, hidden_dim, 1)
        self.method_head = _head(feature_dim, hidden_dim, num_methods)
        self.content_proj = nn.Conv2d(channels, feature_dim, 1)
        reduction = self.forgery_encoder.feature_info[-1]["reduction"]
        self.decoder = AdaINDecoder(feature_dim, 2 * feature_dim, stages=max(1, round(math.log2(reduction))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.common(self.forgery_encoder.forward_features(x))).squeeze(-1)

    def disentangle(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every training output: both logits, pooled common/specific features, self- and cross-reconstructions."""
        forgery = self.forgery_encoder.forward_features(x)
        common, specific = self.common(forgery), self.specific(forgery)
        content = self.content_proj(self.content_encoder.forward_features(x))
        style = torch.cat([_pool(common), _pool(specific)], dim=1)
        size = tuple(x.shape[-2:])
        partner = torch.roll(torch.arange(len(x), device=x.device), shifts=1)
        return {
            "logits": self.head(common).squeeze(-1),
            "method_logits": self.method_head(specific),
            "common": _pool(common),
            "specific": _pool(specific),
            # Content of image i styled with its own forgery features, then with those of another image:
            # both must still rebuild image i, so content cannot hide in the forgery features.
            "self_reconstruction": self.decoder(content, style, size),
            "cross_reconstruction": self.decoder(content, style[partner], size),
        }


class UCFLossWeights(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    common: NonNegativeFloat = 1.0
    specific: NonNegativeFloat = 0.1
    reconstruction: NonNegativeFloat = 0.3
    contrastive: NonNegativeFloat = 0.05


class UCFSettings(TorchSettings):
    backbone: str = Field("legacy_xception", description="timm model name of both encoders")
    pretrained_backbone: bool = Field(False, description="fetch ImageNet weights for the encoders from the hub")
    feature_dim: int = Field(512, ge=8, le=8192, description="channels of the common/specific/content features")
    hidden_dim: int = Field(512, ge=8, le=8192, description="width of the MLPs and heads")
    num_methods: int = Field(4, ge=2, le=1024, description="classes of the method head, class 0 = real")
    loss_weights: UCFLossWeights = UCFLossWeights()
    temperature: PositiveFloat = Field(0.1, description="temperature of the contrastive loss")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (0.5, 0.5, 0.5)
    resize_mode: Literal["center_crop", "short_side"] = "short_side"


@register_detector("UCF")
class UCFDetector(TorchDetector):
    """UCF on aligned 256² face crops (or whole images for the general expert), mean/std 0.5."""

    settings_model = UCFSettings

    def build_model(self) -> nn.Module:
        s = self.settings
        try:
            return UCFNet(s.backbone, s.pretrained_backbone, s.feature_dim, s.hidden_dim, s.num_methods)
        except (RuntimeError, OSError) as exc:  # timm: unknown model name; hub: pretrained weights unavailable
            raise ConfigError(f"UCF backbone {s.backbone!r} cannot be built: {exc}") from exc

    def training_loss(
        self, batch: torch.Tensor, labels: torch.Tensor, methods: torch.Tensor | None = None, **extras: Any
    ) -> torch.Tensor:
        """`Σ weight·term` over CE(common) [binary], CE(specific) [method], L1 reconstruction, contrastive.

        `methods` (N,) holds method indices in [0, num_methods) with 0 = real; without it the labels are used.
        """
        labels = labels.to(batch.device).view(-1)
        methods = labels.long() if methods is None else methods.to(batch.device).long().view(-1)
        if methods.numel() != len(batch) or methods.min() < 0 or methods.max() >= self.settings.num_methods:
            raise ValueError(f"methods must be {len(batch)} indices in [0, {self.settings.num_methods})")
        out = self.model.disentangle(batch)
        terms = {
            "common": F.binary_cross_entropy_with_logits(out["logits"], labels.float()),
            "specific": F.cross_entropy(out["method_logits"], methods),
            "reconstruction": F.l1_loss(out["self_reconstruction"], batch)
            + F.l1_loss(out["cross_reconstruction"], batch),
            "contrastive": 0.5
            * (
                supervised_contrastive(out["common"], labels, self.settings.temperature)
                + supervised_contrastive(out["specific"], methods, self.settings.temperature)
            ),
        }
        weights = self.settings.loss_weights
        total = sum(getattr(weights, name) * value for name, value in terms.items())
        self.last_loss_terms = {name: float(value.detach()) for name, value in terms.items()}
        return total
