"""`bitmind-export gas`: write a detector as a subnet-34 benchmark package (folder, optionally also a zip).

The package holds `model_config.yaml`, `model.py` (the fixed `gas_model.py` with the detector's description filled
in) and `model.safetensors` (the served module's tensors, renamed under `experts.<name>.net.`). Every torch detector
exports; CAMO exports the experts it runs on every image (`always`) with its combining rule, and drops what cannot
run inside a package: the gate's content routes (the dlib face detector is not torch) and the thumbnail route (the
benchmark resizes every image to the declared size before the model sees it).

Declared size: 256 by default — subnet-34 challenges are 256², which then reach the model unresampled, and each
expert crops or resizes from there exactly as its served detector does.
"""

import logging
import math
import pprint
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save as save_safetensors

from base_miner.detectors import aggregator
from base_miner.detectors.base import DeepfakeDetector
from base_miner.detectors.camo import CAMO
from base_miner.detectors.generalist import BACKBONE
from base_miner.detectors.torch_detector import TorchDetector
from base_miner.export import gas_model
from base_miner.export.check import CONFIG_FILE, DEFAULT_WEIGHTS, MAX_SIDE, MODEL_FILE, static_problems
from base_miner.registry import ConfigError, build_detector
from bitmind import __version__
from bitmind.atomic import atomic_write_bytes, atomic_writer

__all__ = ["EXPORTABLE", "ExportError", "ExportResult", "export_gas", "package_source"]

log = logging.getLogger(__name__)

DEFAULT_RESIZE = 256
_PACKAGE_LINE = "PACKAGE: dict[str, Any] = {}  # filled in by bitmind-export"
_FILES = (CONFIG_FILE, MODEL_FILE, DEFAULT_WEIGHTS)


class ExportError(ConfigError):
    """The detector cannot be written as a benchmark package (unsupported kind, bad size, unwritable folder)."""


@dataclass
class ExportResult:
    folder: Path
    zip_path: Path | None
    experts: list[str]
    combine: str
    dropped: list[str] = field(default_factory=list)
    parameters: int = 0


# --- one function per exportable detector kind: (architecture in gas_model, its config, tensors to keep) ---------
def _generalist(d: TorchDetector) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    return "timm_one_logit", {"backbone": BACKBONE}, d.model.state_dict()


def _probe(d: TorchDetector) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    s = d.settings
    config = {"backbone": s.backbone, "include_head": s.include_head, "zoom_crop": s.zoom_crop,
              "half_scale": s.half_scale, "num_features": int(d.model.num_features)}  # fmt: skip
    return "probe", config, d.model.state_dict()


def _npr(d: TorchDetector) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    return "npr", {}, d.model.state_dict()


def _tiny_cnn(d: TorchDetector) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    return "tiny_cnn", {"width": d.settings.width, "flip_average": d.settings.flip_average}, d.model.state_dict()


def _ucf(d: TorchDetector) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """Only the inference path (forgery encoder, common MLP, head): the training-only parts stay behind."""
    s = d.settings
    keep = ("forgery_encoder.", "common.", "head.")
    state = {k: v for k, v in d.model.state_dict().items() if k.startswith(keep)}
    return "ucf", {"backbone": s.backbone, "feature_dim": s.feature_dim, "hidden_dim": s.hidden_dim}, state


EXPORTABLE: dict[str, Callable[[TorchDetector], tuple[str, dict[str, Any], dict[str, torch.Tensor]]]] = {
    "generalist": _generalist, "probe": _probe, "NPR": _npr, "tiny_cnn": _tiny_cnn, "UCF": _ucf,
}  # fmt: skip


def _camo_parts(camo: CAMO) -> tuple[list[tuple[str, DeepfakeDetector]], dict[str, Any], list[str]]:
    """CAMO's always-run experts, its combining rule restricted to them, and the routes that cannot be exported."""
    dropped = [
        f"{name} route ({type(camo.gate).__name__} content gate: not expressible in torch; its images get the "
        f"always-run experts only)"
        for name in camo.content_experts
    ]
    if camo.tiny_expert:
        dropped.append(
            f"{camo.tiny_expert} route for images of at most {camo.tiny_side} px (the benchmark resizes every image "
            f"to the declared size first)"
        )
    names = list(camo.always)
    if camo.combine == "stacked":
        coef = dict(zip(camo.aggregator.feature_names(), camo.aggregator.coef.tolist()))
        # The aggregator clips expert probabilities to [eps, 1 - eps] before taking logits: the same clip on logits.
        eps = aggregator._EPS
        combine = {
            "rule": "stacked",
            "coef": {name: coef[f"logit:{name}"] for name in names},
            "intercept": camo.aggregator.intercept,
            "clip_logit": math.log((1.0 - eps) / eps),
        }
    elif camo.combine == "weighted_mean":
        combine = {"rule": "weighted_mean", "coef": {name: camo.weights[name] for name in names}}
    else:
        combine = {"rule": "max"}
    return [(name, camo.experts[name]) for name in names], combine, dropped


def _expert_spec(name: str, detector: DeepfakeDetector) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    kind = detector.registry_name
    if kind not in EXPORTABLE or not isinstance(detector, TorchDetector):
        raise ExportError(
            f"detector {detector.name!r} ({kind or type(detector).__name__}) has no torch-only export; "
            f"exportable: {sorted(EXPORTABLE)} and CAMO over them"
        )
    arch, arch_config, state = EXPORTABLE[kind](detector)
    s = detector.settings
    spec = {
        "name": name, "arch": arch, "config": arch_config, "image_size": s.image_size,
        "resize_short_side": s.resize_mode == "short_side", "mean": list(s.mean), "std": list(s.std),
    }  # fmt: skip
    tensors = {f"experts.{name}.net.{key}": value.detach().to("cpu").contiguous().clone() for key, value in state.items()}
    return spec, tensors


def package_source(package: dict[str, Any], header: str) -> str:
    """model.py: `gas_model.py` with `PACKAGE` filled in, checked against the benchmark's static rules."""
    template = Path(gas_model.__file__).read_text()
    if template.count(_PACKAGE_LINE) != 1:
        raise ExportError(f"{gas_model.__file__} must hold the line {_PACKAGE_LINE!r} exactly once")
    filled = "PACKAGE: dict[str, Any] = " + pprint.pformat(package, width=110, sort_dicts=False)
    source = "".join(f"# {line}\n" for line in header.splitlines()) + template.replace(_PACKAGE_LINE, filled)
    problems = static_problems(source)
    if problems:
        raise ExportError(f"generated {MODEL_FILE} fails the static check: {'; '.join(problems)}")
    return source


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-") or "detector"


def _write_zip(folder: Path, target: Path) -> Path:
    with atomic_writer(target) as handle, zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in _FILES:  # at the zip's root, as the benchmark's packaging instructions do it
            archive.write(folder / name, arcname=name)
    return target


def export_gas(
    config: str | Path | dict[str, Any],
    out: str | Path,
    resize: int = DEFAULT_RESIZE,
    make_zip: bool = False,
    name: str | None = None,
    version: str = __version__,
) -> ExportResult:
    """Build the detector `config` names (on the CPU) and write it as a benchmark package in `out`."""
    if isinstance(resize, bool) or not isinstance(resize, int) or not 8 <= resize <= MAX_SIDE:
        raise ExportError(f"resize must be an integer in 8..{MAX_SIDE}, got {resize!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} exists and is not a folder")
    detector = build_detector(config, device="cpu")
    if isinstance(detector, CAMO):
        members, combine, dropped = _camo_parts(detector)
    else:
        members, combine, dropped = [("detector", detector)], {"rule": "single"}, []
    specs, tensors = [], {}
    for member_name, member in members:
        spec, member_tensors = _expert_spec(member_name, member)
        specs.append(spec)
        tensors.update(member_tensors)
    package = {"experts": specs, "combine": combine}
    module = gas_model.GasDetector(package)
    try:  # the package's own loader must accept these tensors: fail here, not in the benchmark
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"exported tensors do not fit the package's model: {exc}") from exc
    package_name = name or f"bitmind-{_slug(detector.name)}"
    source_name = "an inline config" if isinstance(config, dict) else str(config)
    experts = ", ".join(f"{s['name']} ({s['arch']}, {s['image_size']} px)" for s in specs)
    header = f"{package_name} {version}: exported by bitmind-export from {source_name}\n"
    header += f"experts: {experts}; combine: {combine['rule']}\n" + "".join(f"dropped: {item}\n" for item in dropped)
    source = package_source(package, header)
    model_config = {
        "name": package_name,
        "version": str(version),
        "modality": "image",
        "preprocessing": {"resize": [resize, resize]},
        "model": {"num_classes": 2, "weights_file": DEFAULT_WEIGHTS},
    }
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "exported_by": f"bitmind-export {__version__}"}
    atomic_write_bytes(out / DEFAULT_WEIGHTS, save_safetensors(tensors, metadata=metadata))
    atomic_write_bytes(out / MODEL_FILE, source.encode())
    atomic_write_bytes(out / CONFIG_FILE, yaml.safe_dump(model_config, sort_keys=False).encode())
    zip_path = _write_zip(out, out.parent / f"{out.name}.zip") if make_zip else None
    parameters = sum(t.numel() for k, t in tensors.items() if t.is_floating_point())
    result = ExportResult(out, zip_path, [s["name"] for s in specs], combine["rule"], dropped, parameters)
    log.info(
        "exported %s to %s%s: experts %s, combine %s, %.2fM numbers, resize %d², dropped %d route(s)",
        package_name, out, f" and {zip_path}" if zip_path else "", result.experts, result.combine,
        parameters / 1e6, resize, len(dropped),
    )  # fmt: skip
    return result
