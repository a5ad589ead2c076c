"""`bitmind-export check`: would subnet 34's benchmark accept this package? Everything it documents, checked offline.

1. The package: a folder, or a zip whose members stay inside it (no absolute paths, no `..`, no links).
2. `model_config.yaml`: name, version, `modality: image`, `preprocessing.resize: [H, W]`, `model.num_classes: 2`,
   and a `model.weights_file` (default `model.safetensors`) that exists in the package and is a safetensors file.
3. `model.py`, statically (an `ast` walk, our own implementation of the published rules): only the allowed
   modules are imported, none of the refused builtins is used, and a top-level `load_model(weights_path,
   num_classes=2)` exists.
4. A load in a fresh Python process without network (`sandbox.py`): `load_model`, one uint8 batch at the declared
   size, logits of shape [B, 2] that are all finite, wall time per image.
Each violation is one specific message; the load only runs once the static checks pass.
"""

import ast
import contextlib
import functools
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from safetensors import SafetensorError, safe_open

from base_miner.export.sandbox import MARKER

__all__ = [
    "ALLOWED_MODULES",
    "CONFIG_FILE",
    "FORBIDDEN_CALLS",
    "MODEL_FILE",
    "CheckReport",
    "PackageError",
    "PackageInfo",
    "check_package",
    "open_package",
    "package_problems",
    "static_problems",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "model_config.yaml"
MODEL_FILE = "model.py"
DEFAULT_WEIGHTS = "model.safetensors"
MAX_SIDE = 4096
MAX_UNZIPPED_BYTES = 8 << 30  # a zip expanding beyond this is refused before anything is written

# Top-level modules model.py may import (the benchmark's published list).
ALLOWED_MODULES = frozenset({
    "torch", "torchvision", "torchaudio", "transformers", "safetensors", "einops", "timm", "flash_attn",
    "PIL", "cv2", "skimage", "decord", "fvcore", "numpy", "scipy",
    "math", "functools", "typing", "collections", "dataclasses", "enum", "abc", "pathlib",
})  # fmt: skip
# Modules the benchmark names as refused, with its reason; anything else outside ALLOWED_MODULES is refused too.
_BLOCKED_REASONS = {
    **dict.fromkeys(("os", "sys", "subprocess", "shutil", "ctypes", "multiprocessing", "signal"), "system access"),
    **dict.fromkeys(("socket", "requests", "urllib", "urllib3", "http", "httpx", "aiohttp", "ftplib"), "network access"),
    **dict.fromkeys(("pickle", "joblib", "dill", "marshal", "shelve", "cloudpickle"), "pickle-like serialisation"),
    **dict.fromkeys(("importlib", "builtins", "runpy", "inspect"), "dynamic import or introspection"),
    **dict.fromkeys(("threading", "asyncio", "concurrent"), "threads"),
    **dict.fromkeys(("numba", "cython"), "JIT compilation"),
    **dict.fromkeys(("apex", "deepspeed"), "training-only"),
    **dict.fromkeys(("wandb", "mlflow", "tensorboard", "tensorboardX"), "logging"),
    **dict.fromkeys(("boto3", "google", "azure"), "cloud SDK"),
    **dict.fromkeys(("sqlite3", "psycopg2", "redis"), "database access"),
}
FORBIDDEN_CALLS = ("eval", "exec", "compile", "__import__", "getattr", "setattr", "globals", "locals")


class PackageError(ValueError):
    """The path is not a readable package (missing, neither folder nor zip, unsafe or broken zip)."""


@dataclass
class PackageInfo:
    """What the config declares, once it is valid."""

    name: str
    resize: tuple[int, int]
    weights_file: str


@dataclass
class CheckReport:
    """The outcome of `check_package`: `problems` empty means the package passed."""

    package: str
    problems: list[str] = field(default_factory=list)
    info: PackageInfo | None = None
    network: str = ""
    load_seconds: float | None = None
    ms_per_image: float | None = None
    batch_size: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


# --- 1. the package ---------------------------------------------------------------------------------------------
def _unsafe_member(member: zipfile.ZipInfo) -> str | None:
    name = member.filename
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name[1:3] == ":/" or name[1:3] == ":\\":
        return "is an absolute path"
    if ".." in path.parts:
        return "leaves the package folder ('..')"
    if stat.S_ISLNK(member.external_attr >> 16):
        return "is a symbolic link"
    return None


def _extract_zip(path: Path, target: Path) -> Path:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            for member in members:
                reason = _unsafe_member(member)
                if reason:
                    raise PackageError(f"zip {str(path)!r}: member {member.filename!r} {reason} (path traversal); refused")
            total = sum(member.file_size for member in members)
            if total > MAX_UNZIPPED_BYTES:
                raise PackageError(f"zip {str(path)!r} expands to {total} bytes, over the {MAX_UNZIPPED_BYTES}-byte limit")
            archive.extractall(target)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise PackageError(f"zip {str(path)!r} cannot be read: {exc}") from exc
    entries = [entry for entry in target.iterdir() if not entry.name.startswith("__MACOSX")]
    if not (target / CONFIG_FILE).exists() and len(entries) == 1 and entries[0].is_dir():
        return entries[0]  # zipped with its folder: the folder is the package
    return target


@contextlib.contextmanager
def open_package(path: str | os.PathLike) -> Iterator[Path]:
    """The package's folder: `path` itself, or a temporary folder holding the zip's checked contents."""
    source = Path(path)
    if source.is_dir():
        yield source
        return
    if not source.is_file():
        raise PackageError(f"package {str(source)!r} does not exist")
    if not zipfile.is_zipfile(source):
        raise PackageError(f"package {str(source)!r} is neither a folder nor a zip file")
    with tempfile.TemporaryDirectory(prefix="gas-package-") as tmp:
        yield _extract_zip(source, Path(tmp))


# --- 2. the config ----------------------------------------------------------------------------------------------
def _config_problems(folder: Path) -> tuple[list[str], PackageInfo | None]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return [f"no {CONFIG_FILE} in the package"], None
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        return [f"{CONFIG_FILE} is not valid YAML: {exc}"], None
    if not isinstance(config, dict):
        return [f"{CONFIG_FILE} must be a mapping"], None
    problems = []
    for key in ("name", "version"):
        if not isinstance(config.get(key), (str, int, float)) or not str(config.get(key)).strip():
            problems.append(f"{CONFIG_FILE}: '{key}' is missing")
    if config.get("modality") != "image":
        problems.append(f"{CONFIG_FILE}: modality must be 'image', got {config.get('modality')!r}")
    preprocessing = config.get("preprocessing") if isinstance(config.get("preprocessing"), dict) else {}
    resize = preprocessing.get("resize")
    if not (isinstance(resize, list) and len(resize) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE for v in resize)):  # fmt: skip
        problems.append(f"{CONFIG_FILE}: preprocessing.resize must be [H, W] with integers in 1..{MAX_SIDE}, got {resize!r}")
        resize = None
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    if model.get("num_classes") != 2:
        problems.append(f"{CONFIG_FILE}: model.num_classes must be 2 ([real, synthetic]), got {model.get('num_classes')!r}")
    weights = model.get("weights_file", DEFAULT_WEIGHTS)
    if not isinstance(weights, str) or not weights or PurePosixPath(weights).name != weights or weights in (".", ".."):
        problems.append(f"{CONFIG_FILE}: model.weights_file must be a file name inside the package, got {weights!r}")
        weights = None
    elif not (folder / weights).is_file():
        problems.append(f"weights file {weights!r} named by {CONFIG_FILE} is missing from the package")
    else:
        try:
            with safe_open(folder / weights, framework="pt") as handle:
                if not list(handle.keys()):
                    problems.append(f"weights file {weights!r} holds no tensors")
        except (SafetensorError, OSError, ValueError) as exc:
            problems.append(f"weights file {weights!r} is not a readable safetensors file: {exc}")
    info = PackageInfo(str(config.get("name")), tuple(resize), weights) if resize and weights else None
    return problems, info


# --- 3. model.py, statically ------------------------------------------------------------------------------------
def _import_problem(module: str, line: int) -> str | None:
    top = module.split(".")[0]
    if top in ALLOWED_MODULES:
        return None
    reason = _BLOCKED_REASONS.get(top)
    why = f"blocked by the benchmark ({reason})" if reason else "not on the benchmark's list of allowed modules"
    return f"{MODEL_FILE} line {line}: imports {module!r}, {why}"


def _accepts_load_model_call(node: ast.FunctionDef) -> bool:
    """Whether `load_model(weights_path, num_classes=2)` binds: one positional argument and a `num_classes`."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    takes_path = bool(positional) or args.vararg is not None
    names = {a.arg for a in [*args.args, *args.kwonlyargs]}
    takes_classes = "num_classes" in names or args.kwarg is not None
    required = len(positional) - len(args.defaults) + sum(d is None for d in args.kw_defaults)
    return takes_path and takes_classes and required <= 2


def static_problems(source: str) -> list[str]:
    """Violations of the benchmark's published import and call rules in `model.py` source, plus its entry point."""
    try:
        tree = ast.parse(source, filename=MODEL_FILE)
    except SyntaxError as exc:
        return [f"{MODEL_FILE} is not valid Python: line {exc.lineno}: {exc.msg}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [p for alias in node.names if (p := _import_problem(alias.name, node.lineno))]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                problems.append(f"{MODEL_FILE} line {node.lineno}: relative import refused (model.py must be self-contained)")
            elif problem := _import_problem(node.module or "", node.lineno):
                problems.append(problem)
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_CALLS:
            problems.append(f"{MODEL_FILE} line {node.lineno}: uses {node.id}(), which the benchmark refuses")
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS:
            hint = " (write model.train(False) instead of model.eval())" if node.attr == "eval" else ""
            problems.append(f"{MODEL_FILE} line {node.lineno}: calls .{node.attr}(), a name the benchmark refuses{hint}")
    entry = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "load_model"]
    if not entry:
        problems.append(f"{MODEL_FILE} defines no top-level function load_model(weights_path, num_classes=2)")
    elif not _accepts_load_model_call(entry[-1]):
        problems.append(f"{MODEL_FILE}: load_model must accept (weights_path, num_classes=2)")
    return problems


def package_problems(folder: Path) -> tuple[list[str], PackageInfo | None]:
    """Config, files and static model.py problems of an opened package (no code is run)."""
    problems, info = _config_problems(folder)
    model = folder / MODEL_FILE
    if not model.is_file():
        problems.append(f"no {MODEL_FILE} in the package")
    else:
        try:
            problems += static_problems(model.read_text())
        except UnicodeDecodeError as exc:
            problems.append(f"{MODEL_FILE} is not UTF-8 text: {exc}")
    return problems, info


# --- 4. the load, in a fresh process without network -------------------------------------------------------------
@functools.cache
def _isolation() -> tuple[tuple[str, ...], str]:
    """The command prefix that gives the child no network, and a description for the report."""
    if shutil.which("unshare"):
        for prefix in (("unshare", "-n"), ("unshare", "-rn")):
            try:
                if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                    return prefix, f"no network: own network namespace ({' '.join(prefix)})"
            except (OSError, subprocess.TimeoutExpired):
                continue
    return (), "no network namespace available (unshare refused): sockets blocked inside the process"


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _load_problem(result: dict[str, Any], batch: int, size: tuple[int, int]) -> str | None:
    stage, error = result.get("stage"), result.get("error", "")
    if stage == "ok":
        return None
    if stage == "import":
        return f"{MODEL_FILE} failed to import: {error}"
    if stage == "entry":
        return f"{MODEL_FILE} has no callable load_model at run time"
    if stage == "load":
        if "state_dict" in error or "size mismatch" in error:
            return f"weights file does not fit the model built by load_model: {error}"
        return f"load_model failed: {error}"
    if stage == "module":
        return f"load_model returned {error}, not a torch.nn.Module"
    batch_text = f"a uint8 batch [{batch}, 3, {size[0]}, {size[1]}]"
    if stage == "forward":
        return f"forward failed on {batch_text}: {error}"
    if stage == "output":
        return f"forward on {batch_text} returned {error}, not logits [B, 2] ordered [real, synthetic]"
    if stage == "shape":
        return f"forward on {batch_text} returned shape {error}; expected ({batch}, 2): logits [real, synthetic]"
    if stage == "nonfinite":
        return f"forward on {batch_text} returned non-finite logits (NaN or inf) for {error} of {batch} images"
    return f"the load check failed: {stage}: {error}"


def _run_load(folder: Path, info: PackageInfo, batch: int, timeout: float) -> tuple[list[str], dict[str, Any], str]:
    prefix, network = _isolation()
    command = [*prefix, sys.executable, "-I", str(Path(__file__).with_name("sandbox.py")),
               str(folder.resolve()), info.weights_file, str(info.resize[0]), str(info.resize[1]), str(batch)]  # fmt: skip
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=folder, env=_child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"load and forward did not finish within {timeout:g} s"], {}, network
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return [f"the check process died (exit code {done.returncode}) before reporting: {tail}"], {}, network
    result = json.loads(lines[-1][len(MARKER) :])
    log.info("load check of %s took %.1f s (%s)", folder, time.perf_counter() - started, network)
    problem = _load_problem(result, batch, info.resize)
    return ([problem] if problem else []), result, network


def check_package(path: str | os.PathLike, batch_size: int = 4, timeout: float = 300.0) -> CheckReport:
    """Every check above; the report lists each violation. Raises `PackageError` for an unreadable package."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    report = CheckReport(package=str(path), batch_size=batch_size)
    with open_package(path) as folder:
        report.problems, report.info = package_problems(folder)
        if report.problems or report.info is None:
            return report
        problems, result, report.network = _run_load(folder, report.info, batch_size, timeout)
        report.problems += problems
        report.load_seconds = result.get("load_seconds")
        report.ms_per_image = result.get("ms_per_image")
    return report
