"""`gas_package`: an exported benchmark package used as a detector, fed exactly as the benchmark feeds it.

Why: "as exported" must be measured on the same images as "as served" (`bitmind-arena --detector PACKAGE`), through
the benchmark's own input pipeline (`bench.bench_input`) and its answer rule (softmax, P(synthetic) = 1 − P(real)).
The package is refused unless it passes the static check first; its `model.py` is then loaded in this process
(the load in a sandbox is `bitmind-export check`'s job).

Config keys: `detector: gas_package`, `package` (folder or zip, relative paths from the YAML's folder),
`batch_size` (default 32), `name`, `device`.
"""

import hashlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from base_miner.detectors.base import DeepfakeDetector, Prediction
from base_miner.detectors.torch_detector import parse_settings
from base_miner.export.bench import bench_input
from base_miner.export.check import CONFIG_FILE, MODEL_FILE, PackageError, PackageInfo, open_package, package_problems
from base_miner.registry import ConfigError, register_detector

__all__ = ["GasPackageDetector", "as_detector_config", "is_package"]

log = logging.getLogger(__name__)


class GasPackageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    detector: str
    package: str = Field(description="exported package: a folder with model_config.yaml, or its zip")
    name: str | None = None
    device: str | None = None
    config_dir: str | None = None
    batch_size: int = Field(32, ge=1, le=4096)


def is_package(path: str | Path) -> bool:
    """A folder holding model_config.yaml, or a .zip file: what `bitmind-export gas` writes."""
    path = Path(path)
    return (path.is_dir() and (path / CONFIG_FILE).is_file()) or (path.suffix == ".zip" and path.is_file())


def as_detector_config(spec: str | Path | dict[str, Any]) -> str | Path | dict[str, Any]:
    """A package path becomes a `gas_package` config; any other detector spec is returned unchanged."""
    if isinstance(spec, (str, Path)) and is_package(spec):
        return {"detector": "gas_package", "package": str(Path(spec).resolve())}
    return spec


def _load_module(model_py: Path):
    """Import the package's model.py under a name of its own (several packages can be loaded side by side)."""
    name = "gas_package_" + hashlib.sha256(str(model_py.resolve()).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, model_py)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - foreign code: any failure means the package cannot be used
        sys.modules.pop(name, None)
        raise ConfigError(f"{model_py} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


@register_detector("gas_package")
class GasPackageDetector(DeepfakeDetector):
    """P(synthetic) from an exported package, on the benchmark's inputs."""

    def __init__(self, config: dict[str, Any], device: str | None = None) -> None:
        super().__init__(config, device)
        self.settings = parse_settings(GasPackageSettings, self.config)
        path = Path(self.settings.package).expanduser()
        if not path.is_absolute() and self.settings.config_dir:
            path = Path(self.settings.config_dir) / path
        try:
            with open_package(path) as folder:  # a zip's temporary copy is only needed until the weights are loaded
                model, info = self._load(path, folder)
        except PackageError as exc:
            raise ConfigError(str(exc)) from exc
        self.size = info.resize
        self.package_name = info.name
        self.model = model.to(self.device)
        self.model.train(False)
        log.info("gas package %s ready: %s, input %dx%d, device %s", info.name, path, *self.size, self.device)

    @staticmethod
    def _load(path: Path, folder: Path) -> tuple[torch.nn.Module, PackageInfo]:
        problems, info = package_problems(folder)
        if problems or info is None:
            raise ConfigError(f"package {str(path)!r} fails the benchmark's checks: {'; '.join(problems)}")
        module = _load_module(folder / MODEL_FILE)
        try:
            model = module.load_model(str(folder / info.weights_file), num_classes=2)
        except Exception as exc:  # noqa: BLE001 - foreign code
            raise ConfigError(f"package {str(path)!r}: load_model failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"package {str(path)!r}: load_model returned {type(model).__name__}, not a torch.nn.Module")
        return model, info

    def predict_detailed(self, images: Sequence[Image.Image]) -> list[Prediction]:
        images = list(images)
        probabilities: list[float] = []
        step = self.settings.batch_size
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            if not all(isinstance(image, Image.Image) for image in chunk):
                raise TypeError(f"{self.name} expects PIL images")
            batch = np.stack([bench_input(image, self.size).transpose(2, 0, 1) for image in chunk])
            with torch.inference_mode():
                logits = self.model(torch.from_numpy(batch).to(self.device))
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(chunk), 2):
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise RuntimeError(f"{self.name} returned {shape} for {len(chunk)} images; expected ({len(chunk)}, 2)")
            probs = torch.softmax(logits.float(), dim=1)[:, 1]
            if torch.isnan(probs).any():
                log.warning("%s produced NaN for %d images; answering 0.5", self.name, int(torch.isnan(probs).sum()))
            probabilities.extend(probs.nan_to_num(0.5).clamp(0.0, 1.0).cpu().tolist())
        return [Prediction(p, route=self.name, experts={self.name: p}) for p in probabilities]
