"""`TorchDetector`: what every PyTorch detector shares — config checking, weight loading at start-up,
deterministic preprocessing, batched fp16-on-CUDA inference, the default training loss, and saving.

A subclass supplies `build_model()` (an `nn.Module` mapping a normalised (N, 3, H, W) batch to N logits) and, when
its settings differ, a `settings_model`. Everything else — the miner's inference path and the trainer's hooks
(`transform`, `logits`, `training_loss`, `save`) — lives here once.
"""

import abc
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from base_miner.checkpoint import MACHINE_KEYS, WeightsError, load_state_dict, resolve_weights, save_checkpoint
from base_miner.detectors.base import DeepfakeDetector, Prediction
from base_miner.detectors.folding import FoldedInference
from base_miner.detectors.onnx_serving import onnxruntime_missing
from base_miner.registry import ConfigError
from bitmind.image_codec import to_rgb

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TorchDetector", "TorchSettings", "fit_image", "parse_settings"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchSettings(BaseModel):
    """YAML keys every torch detector accepts; unknown keys are rejected so a typo cannot pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detector: str
    name: str | None = None
    weights: str | None = Field(None, description="checkpoint folder or hub id 'org/name[@revision]'; null = untrained")
    config_dir: str | None = Field(None, description="folder of the YAML (set by load_config); anchors relative paths")
    device: str | None = None
    image_size: int = Field(256, ge=8, le=4096, description="side of the square the model sees")
    resize_mode: Literal["center_crop", "short_side"] = Field(
        "short_side",
        description="center_crop: crop without resampling (upscale only images smaller than image_size); "
        "short_side: resize the short side to image_size, then crop",
    )
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD
    batch_size: int = Field(32, ge=1, le=4096, description="images per forward pass")
    half: bool = Field(False, description="fp16 autocast on CUDA; ignored (fp32) on CPU")
    num_threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads; null = torch default")
    runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="engine for a frozen trunk on the CPU: onnxruntime exports it once and serves it through ONNX "
        "Runtime; auto = onnxruntime where installed, else torch; on CUDA torch always serves",
    )
    training: dict[str, Any] | None = Field(None, description="free-form section read by the trainer only")


def parse_settings(model: type[BaseModel], config: dict[str, Any]) -> BaseModel:
    """Validate a config dict against `model`, turning pydantic's report into one `ConfigError` line."""
    try:
        return model.model_validate(config)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '<config>'}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"{config.get('detector', '?')} config is invalid: {problems}") from exc


def fit_image(image: Image.Image, size: int, mode: str) -> Image.Image:
    """A `size`² RGB view of `image`: centre crop, resampling (bicubic, antialiased) only when `mode` asks or the
    image is too small. Cropping keeps the pixel-level traces (up-sampling grids, JPEG blocks) detectors read."""
    width, height = image.size
    if min(width, height) < 1:
        raise ValueError(f"image {width}x{height} has no pixels")
    short = min(width, height)
    if short < size or (mode == "short_side" and short != size):
        scale = size / short
        image = image.resize(
            (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BICUBIC
        )
        width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _torch_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown torch device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


class TorchDetector(DeepfakeDetector):
    """A detector backed by one `nn.Module`; weights are loaded (and checked) in `__init__`."""

    settings_model: ClassVar[type[TorchSettings]] = TorchSettings

    def __init__(self, config: dict[str, Any], device: str | None = None) -> None:
        super().__init__(config, device)
        self.settings = parse_settings(self.settings_model, self.config)
        self.torch_device = _torch_device(self.device)
        self.half = self.settings.half and self.torch_device.type == "cuda"
        if self.settings.half and not self.half:
            log.info("%s: half precision needs CUDA; running fp32 on %s", self.name, self.torch_device)
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        self.last_loss_terms: dict[str, float] = {}
        self.model = self.build_model()
        if self.settings.weights:
            folder = resolve_weights(self.settings.weights, self.settings.config_dir)
            self.load_weights(load_state_dict(folder))
            source = str(folder)
        else:
            log.warning("%s: no trained weights (weights: null); its answers mean nothing until trained", self.name)
            self.load_pretrained()
            source = "untrained"
        self.model.to(self.torch_device).eval()
        if isinstance(self.model, FoldedInference):  # its frozen part serves folded (same outputs, less CPU)
            self.model.fold_for_inference(onnx=self._serve_onnx())
        self._mean = torch.tensor(self.settings.mean).view(3, 1, 1)
        self._std = torch.tensor(self.settings.std).view(3, 1, 1)
        log.info(
            "%s ready: %.2fM parameters, weights=%s, device=%s, %s, batch %d, input %d²",
            self.name,
            self.num_parameters / 1e6,
            source,
            self.torch_device,
            "fp16" if self.half else "fp32",
            self.settings.batch_size,
            self.settings.image_size,
        )

    def _serve_onnx(self) -> bool:
        """Whether ONNX Runtime serves the frozen trunk, by `runtime`, device and what is installed."""
        runtime = self.settings.runtime
        if runtime == "torch" or not self.model.serves_onnx:
            return False
        if self.torch_device.type != "cpu":
            if runtime == "onnxruntime":
                log.info("%s: runtime onnxruntime serves CPU devices only; torch serves on %s", self.name,
                         self.torch_device)  # fmt: skip
            return False
        missing = onnxruntime_missing()
        if missing and runtime == "onnxruntime":
            raise ConfigError(
                f"{self.name}: runtime onnxruntime needs {', '.join(missing)}: pip install {' '.join(missing)}"
            )
        if missing:
            log.info("%s: %s not installed; torch serves the frozen trunk", self.name, ", ".join(missing))
        return not missing

    # --- what subclasses provide -------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The network, randomly initialised; it maps a normalised (N, 3, H, W) batch to logits (N,)."""

    def load_pretrained(self) -> None:
        """Hook for detectors with a pretrained backbone, called when no trained `weights` are configured."""

    # --- weights -----------------------------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a full checkpoint, refusing (with the offending names) any that does not fit the architecture."""
        expected = self.model.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        wrong_shape = [
            f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
            for key in sorted(set(expected) & set(state_dict))
            if state_dict[key].shape != expected[key].shape
        ]
        problems = [
            f"{label} ({len(items)}): {', '.join(items[:5])}{' …' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if items
        ]
        if problems:
            raise WeightsError(
                f"{self.name}: checkpoint does not match the configured architecture: {'; '.join(problems)}"
            )
        self.model.load_state_dict(state_dict)

    def export_config(self) -> dict[str, Any]:
        """The complete config (defaults filled in) that rebuilds this model, without machine-specific keys."""
        return self.settings.model_dump(mode="json", exclude=set(MACHINE_KEYS))

    def save(self, folder: str | Path) -> Path:
        """Write `model.safetensors` + `config.yaml`; `build_detector(folder / 'config.yaml')` reloads them."""
        return save_checkpoint(folder, self.export_config(), self.model.state_dict())

    # --- preprocessing, inference, training --------------------------------------------------------------------
    def transform(self, image: Image.Image) -> torch.Tensor:
        """Deterministic eval preprocessing: RGB, `fit_image` to `image_size`², scale to [0, 1], normalise."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"{self.name} expects PIL images, got {type(image).__name__}")
        image = fit_image(to_rgb(image), self.settings.image_size, self.settings.resize_mode)
        tensor = pil_to_tensor(image).float().div_(255.0)
        return (tensor - self._mean) / self._std

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw scores (N,) for a normalised batch; runs with autograd so training can call it."""
        return self.model(batch)

    def training_loss(self, batch: torch.Tensor, labels: torch.Tensor, **extras: Any) -> torch.Tensor:
        """Binary cross-entropy on the logits (labels: 1 = AI-generated); subclasses may add terms."""
        loss = F.binary_cross_entropy_with_logits(self.logits(batch), labels.to(batch.device).float().view(-1))
        self.last_loss_terms = {"bce": float(loss.detach())}
        return loss

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.float16) if self.half else contextlib.nullcontext()

    def predict_detailed(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Probabilities in [0, 1], computed in chunks of `batch_size` without autograd."""
        images = list(images)
        probabilities: list[float] = []
        size = self.settings.batch_size
        for start in range(0, len(images), size):
            chunk = images[start : start + size]
            batch = torch.stack([self.transform(image) for image in chunk]).to(self.torch_device, non_blocking=True)
            with torch.inference_mode(), self._autocast():
                logits = self.logits(batch)
            if logits.numel() != len(chunk):
                raise RuntimeError(f"{self.name} returned {logits.numel()} logits for {len(chunk)} images")
            probs = torch.sigmoid(logits.float().view(-1))
            if torch.isnan(probs).any():
                log.warning("%s produced NaN for %d images; answering 0.5", self.name, int(torch.isnan(probs).sum()))
            probabilities.extend(probs.nan_to_num(0.5).clamp(0.0, 1.0).tolist())
        return [Prediction(p, route=self.name, experts={self.name: p}) for p in probabilities]
