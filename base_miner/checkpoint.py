"""Detector checkpoints: a folder holding `model.safetensors` and the `config.yaml` that built the model.

A config's `weights:` value names the folder: an existing local path (absolute, relative to the YAML's folder, or
under `base_miner/weights/`), else a hub repo id `org/name[@revision]` fetched with `snapshot_download`. Every
failure is a `WeightsError` raised while the detector is built, so a miner never starts with a model it cannot load.
"""

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from base_miner.registry import ConfigError
from bitmind.atomic import atomic_write_bytes
from bitmind.hub_id import parse_hub_ref

__all__ = [
    "CONFIG_FILE",
    "MACHINE_KEYS",
    "WEIGHTS_DIR",
    "WEIGHTS_FILE",
    "WeightsError",
    "load_state_dict",
    "resolve_weights",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
# Keys that describe the machine or the file a config was read from, not the model: never saved with weights.
MACHINE_KEYS = ("config_dir", "device", "num_threads", "runtime")


class WeightsError(ConfigError):
    """A checkpoint is missing, unreadable, or does not fit the architecture its config describes."""


def _local_candidates(value: str, config_dir: str | Path | None) -> list[Path]:
    path = Path(value).expanduser()
    if path.is_absolute():
        return [path]
    base = Path(config_dir) if config_dir else Path.cwd()
    return [base / path, WEIGHTS_DIR / path]


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    log.info("fetching detector weights %s@%s from the hub", repo_id, revision or "main")
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=["*.safetensors", "*.yaml"])
        )
    except Exception as exc:  # the hub client raises many types (HTTP, offline, validation); all mean "no weights"
        raise WeightsError(
            f"could not fetch weights {repo_id!r} (revision {revision or 'main'}) from the hub: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def resolve_weights(value: str | os.PathLike, config_dir: str | Path | None = None) -> Path:
    """The local folder holding the checkpoint `value` names, downloading it from the hub when it is a repo id."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise WeightsError(f"weights must be a folder path or a hub id 'org/name[@revision]', got {value!r}")
    text = str(value).strip()
    candidates = _local_candidates(text, config_dir)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
        if candidate.exists():
            raise WeightsError(f"weights {str(candidate)!r} is a file; give the folder that holds {WEIGHTS_FILE}")
    ref = parse_hub_ref(text)
    if ref is None:
        tried = ", ".join(repr(str(c)) for c in candidates)
        raise WeightsError(f"weights folder {text!r} not found (tried {tried}) and it is not a hub id 'org/name'")
    return _download(*ref)


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `folder/model.safetensors`, on the CPU (safetensors only: no pickle is ever loaded)."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(f"no {WEIGHTS_FILE} in weights folder {str(folder)!r}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc


def _plain(value: Any) -> Any:
    """YAML-safe copy: tuples become lists, paths become strings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def save_checkpoint(folder: str | Path, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write `model.safetensors` and `config.yaml` into `folder` (each replaced atomically) and return it.

    The saved config points `weights` at its own folder (`.`), so `build_detector(folder / "config.yaml")`
    rebuilds the same model, and drops the machine-specific keys in `MACHINE_KEYS`.
    """
    folder = Path(folder)
    saved = {k: v for k, v in _plain(config).items() if k not in MACHINE_KEYS}
    saved["weights"] = "."
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()}
    metadata = {"format": "pt", "detector": str(saved.get("detector", ""))}
    atomic_write_bytes(folder / WEIGHTS_FILE, save_safetensors(tensors, metadata=metadata))
    atomic_write_bytes(folder / CONFIG_FILE, yaml.safe_dump(saved, sort_keys=False).encode())
    log.info("saved checkpoint %s (%d tensors)", folder, len(tensors))
    return folder
