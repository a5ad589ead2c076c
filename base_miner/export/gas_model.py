"""The `model.py` of an exported subnet-34 (gasbench) package: `bitmind-export gas` copies this file and fills in
`PACKAGE` with the exported detector's description.

Why one fixed file: a package must be self-contained and pass the benchmark's static check, so it may import only
torch / torchvision / timm / safetensors / math / typing and call nothing the check refuses (no `eval`, `getattr`,
...). Every architecture the project exports is written out here once; `tests/test_export.py` proves each one gives
the served detector's probabilities.

`forward` takes uint8 RGB `[B, 3, H, W]` at the declared size and returns logits `[B, 2]` ordered
`[real, synthetic]`. Each expert first brings the batch to its own input the way the served detector does (centre
crop without resampling, or a bicubic resize of the short side), scales to [0, 1], normalises, and computes one
"AI-generated" logit z; the experts' logits are combined as the exported detector combines them, and the answer is
`[0, z]` so that softmax gives sigmoid(z).
"""

import math
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1

PACKAGE: dict[str, Any] = {}  # filled in by bitmind-export


# --- architectures (state-dict names equal those of the served detectors' modules) ------------------------------
class OneLogit(nn.Module):
    """A timm classifier with one output (the generalist)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.net = timm.create_model(config["backbone"], pretrained=False, num_classes=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class FrozenProbe(nn.Module):
    """EfficientNet-Lite read at every depth (mean and std per stage, optionally the pooled head, optionally the
    same statistics of the centre crop read with the stem at stride 1, optionally those of the image at half its
    side) → standardise → linear logit."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = timm.create_model(config["backbone"], pretrained=False, num_classes=0)
        self.include_head = bool(config["include_head"])
        self.zoom_crop = config.get("zoom_crop")
        self.half_scale = bool(config.get("half_scale", False))
        features = int(config["num_features"])
        self.register_buffer("feature_mean", torch.zeros(features))
        self.register_buffer("feature_scale", torch.ones(features))
        self.head = nn.Linear(features, 1)

    def stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        pooled = []
        for stage in self.backbone.blocks:
            x = stage(x)
            pooled += [x.mean((2, 3)), x.std((2, 3))]
        return pooled, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        pooled, last = self.stages(net.bn1(net.conv_stem(x)))
        if self.include_head:
            pooled.append(net.bn2(net.conv_head(last)).mean((2, 3)))
        if self.zoom_crop:
            side = int(self.zoom_crop)
            top, left = max((x.shape[-2] - side) // 2, 0), max((x.shape[-1] - side) // 2, 0)
            stem = net.conv_stem
            crop = x[..., top : top + side, left : left + side]
            padding = (stem.kernel_size[0] // 2, stem.kernel_size[1] // 2)
            zoomed = F.conv2d(crop, stem.weight, stem.bias, stride=1, padding=padding)
            pooled += self.stages(net.bn1(zoomed))[0]
        if self.half_scale:
            pooled += self.stages(net.bn1(net.conv_stem(F.avg_pool2d(x, 2, ceil_mode=True))))[0]
        features = torch.cat(pooled, 1)
        return self.head((features - self.feature_mean) / self.feature_scale).squeeze(-1)


def npr(x: torch.Tensor) -> torch.Tensor:
    """Each pixel minus the top-left pixel of its 2x2 block (odd sides lose their last row/column)."""
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :height, :width]
    coarse = F.interpolate(x, scale_factor=0.5, mode="nearest")
    return x - F.interpolate(coarse, scale_factor=2.0, mode="nearest")


def resnet_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    outplanes = planes * Bottleneck.expansion
    shortcut = None
    if stride != 1 or inplanes != outplanes:
        shortcut = nn.Sequential(conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))
    layers = [Bottleneck(inplanes, planes, stride, shortcut)]
    layers += [Bottleneck(outplanes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class NPRNet(nn.Module):
    """npr → conv3x3/2 → BN → ReLU → maxpool → ResNet-50 layer1 and layer2 → pool → one logit."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.layer1 = resnet_stage(64, 64, blocks=3, stride=1)
        self.layer2 = resnet_stage(64 * Bottleneck.expansion, 128, blocks=4, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128 * Bottleneck.expansion, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(npr(x))))
        return self.fc(torch.flatten(self.pool(x), 1)).squeeze(-1)


class UCFInference(nn.Module):
    """UCF's inference path: forgery encoder → common-feature MLP (1x1 convolutions) → real/fake head."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.forgery_encoder = timm.create_model(config["backbone"], pretrained=False, num_classes=0, global_pool="")
        channels, hidden, features = self.forgery_encoder.num_features, config["hidden_dim"], config["feature_dim"]
        self.common = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(hidden, features, 1)
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(features, hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.common(self.forgery_encoder.forward_features(x))).squeeze(-1)


def conv_block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
        nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
    )  # fmt: skip


class TinyCNN(nn.Module):
    """Three two-convolution stages, global average pooling, one logit (the thumbnail expert); with
    `flip_average`, the mean of the logits of the image and its mirror image, as served."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        width = int(config["width"])
        self.flip_average = bool(config.get("flip_average", False))
        self.features = nn.Sequential(
            conv_block(3, width), nn.MaxPool2d(2), conv_block(width, 2 * width), nn.MaxPool2d(2),
            conv_block(2 * width, 4 * width),
        )  # fmt: skip
        # nn.Identity where the served net has its (training-only) dropout, so the head's indices match
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Identity(), nn.Linear(4 * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x)).squeeze(-1)
        if self.flip_average:
            logits = (logits + self.head(self.features(x.flip(3))).squeeze(-1)) / 2
        return logits


ARCHITECTURES = {"timm_one_logit": OneLogit, "probe": FrozenProbe, "npr": NPRNet, "ucf": UCFInference, "tiny_cnn": TinyCNN}


# --- the package's module ---------------------------------------------------------------------------------------
class Expert(nn.Module):
    """One served detector: its own crop/resize and normalisation, then its network's logit."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.net = ARCHITECTURES[spec["arch"]](spec["config"])
        self.size = int(spec["image_size"])
        self.resize_short_side = bool(spec["resize_short_side"])
        self.register_buffer("mean", torch.tensor(spec["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def resample(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if (int(x.shape[-2]), int(x.shape[-1])) == (height, width):
            return x
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        return x.round().clamp(0.0, 255.0)

    def fit(self, x: torch.Tensor) -> torch.Tensor:
        """A size² view of a [0, 255] batch: resample only when the short side must change, then centre-crop.
        Resampling is bicubic and antialiased, horizontal pass then vertical pass, each rounded to 8 bits: that is
        how the served detector's image library resizes (pixel values then agree within 1 of 255)."""
        height, width = int(x.shape[-2]), int(x.shape[-1])
        short = min(height, width)
        if short < self.size or (self.resize_short_side and short != self.size):
            scale = self.size / short
            new_height, new_width = max(self.size, round(height * scale)), max(self.size, round(width * scale))
            x = self.resample(self.resample(x, height, new_width), new_height, new_width)
            height, width = new_height, new_width
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return x[:, :, top : top + self.size, left : left + self.size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((self.fit(x) / 255.0 - self.mean) / self.std)


class GasDetector(nn.Module):
    """All experts on every image, combined by the exported rule: single, max, weighted_mean or stacked."""

    def __init__(self, package: dict[str, Any]) -> None:
        super().__init__()
        self.experts = nn.ModuleDict({spec["name"]: Expert(spec) for spec in package["experts"]})
        combine = package["combine"]
        self.rule = combine["rule"]
        if self.rule not in ("single", "max", "stacked", "weighted_mean"):
            raise ValueError(f"unknown combining rule {self.rule!r}")
        coef = [float(combine.get("coef", {}).get(name, 1.0)) for name in self.experts]
        self.register_buffer("coef", torch.tensor(coef, dtype=torch.float32), persistent=False)
        self.intercept = float(combine.get("intercept", 0.0))
        self.clip_logit = float(combine.get("clip_logit", math.inf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch [B, 3, H, W], got shape {tuple(x.shape)}")
        x = x.float()
        logits = torch.stack([expert(x) for expert in self.experts.values()], 1)
        if self.rule == "single":
            z = logits[:, 0]
        elif self.rule == "max":
            z = logits.max(1).values
        elif self.rule == "stacked":
            z = self.intercept + (logits.clamp(-self.clip_logit, self.clip_logit) * self.coef).sum(1)
        else:  # weighted_mean of probabilities: answer log-probabilities so softmax returns that mean exactly
            p = (torch.sigmoid(logits) * self.coef).sum(1) / self.coef.sum()
            p = p.clamp(1e-7, 1.0 - 1e-7)
            return torch.stack([torch.log1p(-p), torch.log(p)], 1)
        return torch.stack([torch.zeros_like(z), z], 1)


def load_model(weights_path: str, num_classes: int = 2) -> nn.Module:
    """The benchmark's entry point: build the exported detector and load its weights (every tensor must fit)."""
    if num_classes != 2:
        raise ValueError(f"this detector answers two classes [real, synthetic], not {num_classes}")
    model = GasDetector(PACKAGE)
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    model.train(False)
    return model
