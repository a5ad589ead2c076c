"""Frozen trunks served on the CPU by ONNX Runtime instead of eager PyTorch.

Why: a frozen EfficientNet-Lite trunk is a fixed graph of small convolutions, and ONNX Runtime's fused CPU kernels
run it at well under half the eager cost even after batch-norm folding (README "Benchmarks"). Nothing is learnt
from it, so serving it from an exported graph changes no answer beyond float rounding.

The export (`torch.onnx.export` through `torch.export`) takes seconds, so it happens once per trunk: lazily, at the
first inference call (a miner's warm-up), keyed by a hash of the architecture and weights. The graph is kept in
memory for the process and on disk (`BITMIND_CACHE_DIR`, default `~/.cache/bitmind`) for the next process; every
probe built on the same ImageNet backbone shares one graph. One session exists per torch thread count, so ONNX
Runtime follows `torch.set_num_threads` exactly as the torch path does. If anything in the export fails, the trunk
logs why once and the folded torch copy serves from then on.
"""

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitmind.atomic import atomic_write_bytes

__all__ = ["OnnxTrunk", "cache_dir", "onnxruntime_missing"]

log = logging.getLogger(__name__)
# The exporter's passes log every rewrite at INFO: one export, dozens of lines.
for _chatty in ("onnx_ir", "onnxscript"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)

_REQUIRED = ("onnxruntime", "onnx", "onnxscript")
_GRAPHS: dict[str, bytes] = {}  # content hash -> serialised ONNX model, shared by every trunk in the process
_GRAPHS_LOCK = threading.Lock()


def onnxruntime_missing() -> list[str]:
    """The packages the ONNX path needs that are not installed (empty when it can run)."""
    return [name for name in _REQUIRED if importlib.util.find_spec(name) is None]


def cache_dir() -> Path:
    explicit = os.environ.get("BITMIND_CACHE_DIR")
    root = Path(explicit) if explicit else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bitmind"
    return root / "onnx"


def _content_hash(module: nn.Module, shape: tuple[int, ...]) -> str:
    digest = hashlib.sha256()
    digest.update(f"{torch.__version__}|{shape}|{module!r}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _export(module: nn.Module, example: torch.Tensor) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        module, (example,), dynamo=True, input_names=["x"], dynamic_shapes=({0: batch},), verbose=False
    )
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


def _graph(module: nn.Module, shape: tuple[int, ...], fresh: bool = False) -> bytes:
    """The trunk's ONNX graph for inputs of `shape` (C, H, W): from memory, the disk cache, or (always with `fresh`)
    a new export, which replaces the cached file."""
    key = _content_hash(module, shape)
    with _GRAPHS_LOCK:
        if key in _GRAPHS and not fresh:
            return _GRAPHS[key]
        path = cache_dir() / f"{key}.onnx"
        graph = None
        if not fresh:
            with contextlib.suppress(OSError):  # not cached yet (or unreadable): export it
                graph = path.read_bytes()
        if graph is None:
            log.info("exporting a frozen trunk to ONNX for ONNX Runtime (once per trunk; cached as %s)", path)
            graph = _export(module, torch.zeros(2, *shape))
            try:
                atomic_write_bytes(path, graph)
            except OSError as exc:
                log.info("ONNX cache %s is not writable (%s); the graph lives in memory only", path.parent, exc)
        _GRAPHS[key] = graph
        return graph


class OnnxTrunk:
    """Serves `module` (frozen, eval mode, tensor in → one tensor out) through ONNX Runtime on the CPU.

    `__call__` returns None where it cannot serve (not a float32 CPU batch, or the export failed), and the caller
    runs the torch module instead."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._sessions: dict[tuple[tuple[int, ...], int], object] = {}
        self._lock = threading.Lock()
        self.failed: str | None = None

    def _session(self, shape: tuple[int, ...]):  # noqa: ANN202 - onnxruntime.InferenceSession
        threads = torch.get_num_threads()
        key = (shape, threads)
        session = self._sessions.get(key)
        if session is not None:
            return session
        with self._lock:
            if key not in self._sessions:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                providers = ["CPUExecutionProvider"]
                try:
                    session = onnxruntime.InferenceSession(_graph(self.module, shape), options, providers=providers)
                except Exception as exc:  # noqa: BLE001 - e.g. a truncated or foreign file in the cache
                    log.warning("the cached ONNX graph does not load (%s); exporting it again", exc)
                    session = onnxruntime.InferenceSession(
                        _graph(self.module, shape, fresh=True), options, providers=providers
                    )
                self._sessions[key] = session
            return self._sessions[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.failed is not None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or not len(x):
            return None
        try:
            session = self._session(tuple(x.shape[1:]))
        except Exception as exc:  # noqa: BLE001 - any export/runtime failure falls back to torch, said once
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("ONNX Runtime cannot serve this trunk (%s); the torch copy serves instead", self.failed)
            return None
        (output,) = session.run(None, {"x": np.ascontiguousarray(x.numpy())})
        return torch.from_numpy(output)
