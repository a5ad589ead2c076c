"""Registries of detectors and gates, and the factory that builds a detector from its YAML config."""

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CONFIG_DIR",
    "DETECTORS",
    "GATES",
    "ConfigError",
    "build_detector",
    "build_gate",
    "load_config",
    "packaged_configs",
    "register_detector",
    "register_gate",
]

CONFIG_DIR = Path(__file__).parent / "configs"
DETECTORS: dict[str, type] = {}
GATES: dict[str, type] = {}

# Modules whose import registers the built-in detectors and gates.
_BUILTIN_MODULES = (
    "base_miner.detectors.npr",
    "base_miner.detectors.ucf",
    "base_miner.detectors.generalist",
    "base_miner.detectors.probe",
    "base_miner.detectors.tall",
    "base_miner.detectors.segmenter",
    "base_miner.detectors.tiny_cnn",
    "base_miner.detectors.baseline",
    "base_miner.detectors.camo",
    "base_miner.gates.face",
    "base_miner.export.package_detector",
)


class ConfigError(ValueError):
    """A detector config is missing, malformed or names something unknown."""


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if name in table and table[name] is not cls:
            raise ConfigError(f"{kind} {name!r} is registered twice")
        table[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def register_detector(name: str) -> Callable[[type], type]:
    """Class decorator: make a `DeepfakeDetector` buildable by `detector: <name>` in YAML."""
    return _register(DETECTORS, "detector", name)


def register_gate(name: str) -> Callable[[type], type]:
    """Class decorator: make a gate buildable by `gate: <name>` in a CAMO config."""
    return _register(GATES, "gate", name)


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def packaged_configs() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def load_config(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Resolve a config given as a dict, a YAML path, or the name of a packaged config (`camo`, `npr`, ...)."""
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{config}.yaml"
        if not path.exists():
            raise ConfigError(f"no packaged detector config {str(config)!r}; choose from {packaged_configs()}")
    if not path.is_file():
        raise ConfigError(f"detector config {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"detector config {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or "detector" not in data:
        raise ConfigError(f"detector config {str(path)!r} must be a mapping with a 'detector' key")
    data.setdefault("config_dir", str(path.parent.resolve()))
    return data


def build_detector(config: str | Path | dict[str, Any], device: str | None = None, **overrides: Any):
    """Build (and load weights for) the detector a config describes."""
    _load_builtins()
    data = load_config(config)
    data.update(overrides)
    name = data.get("detector")
    if name not in DETECTORS:
        raise ConfigError(f"unknown detector {name!r}; registered: {sorted(DETECTORS)}")
    return DETECTORS[name](data, device=device)


def build_gate(config: dict[str, Any]):
    """Build the gate a CAMO config names under `gate`."""
    _load_builtins()
    name = config.get("name") if isinstance(config, dict) else config
    if name not in GATES:
        raise ConfigError(f"unknown gate {name!r}; registered: {sorted(GATES)}")
    return GATES[name](config if isinstance(config, dict) else {"name": name})
