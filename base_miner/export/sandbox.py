"""The child process of `bitmind-export check`: load a package through its `load_model` and run one batch.

Run as a script (`python -I sandbox.py FOLDER WEIGHTS H W BATCH`) in a fresh interpreter, normally inside its own
network namespace; it also makes every socket connection fail, so a package that reaches for the network fails
here as it would in the benchmark's sandbox. Prints one line `BITMIND-CHECK-RESULT {json}`: the stage reached
("ok", or where it failed), the error, the load time and the wall time per image of a batch after a warm-up batch.
"""

import importlib.util
import json
import socket
import sys
import time
import traceback
from pathlib import Path

MARKER = "BITMIND-CHECK-RESULT "  # check.py reads it from here; this script imports nothing from the project


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled during the package check")


def _block_sockets() -> None:
    socket.socket.connect = _no_network
    socket.socket.connect_ex = _no_network
    socket.create_connection = _no_network
    socket.getaddrinfo = _no_network


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 600 else text[:600] + " …"


def _run(folder: Path, weights: str, height: int, width: int, batch: int) -> dict:
    try:
        spec = importlib.util.spec_from_file_location("gas_package_model", folder / "model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gas_package_model"] = module
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - any failure of foreign code is the finding
        return {"stage": "import", "error": _error(exc)}
    load_model = module.__dict__.get("load_model")
    if not callable(load_model):
        return {"stage": "entry", "error": "no load_model"}
    import torch

    started = time.perf_counter()
    try:
        model = load_model(str(folder / weights), num_classes=2)
    except BaseException as exc:  # noqa: BLE001
        return {"stage": "load", "error": _error(exc)}
    load_seconds = time.perf_counter() - started
    if not isinstance(model, torch.nn.Module):
        return {"stage": "module", "error": type(model).__name__}
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)
    try:
        with torch.inference_mode():
            model(images)  # warm-up: first-call allocations and kernel selection
            started = time.perf_counter()
            logits = model(images)
            seconds = time.perf_counter() - started
    except BaseException as exc:  # noqa: BLE001
        return {"stage": "forward", "error": _error(exc)}
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        kind = type(logits).__name__ if not isinstance(logits, torch.Tensor) else f"a {logits.dtype} tensor"
        return {"stage": "output", "error": kind}
    if tuple(logits.shape) != (batch, 2):
        return {"stage": "shape", "error": str(tuple(logits.shape))}
    bad = int((~torch.isfinite(logits)).any(dim=1).sum())
    if bad:
        return {"stage": "nonfinite", "error": str(bad)}
    return {"stage": "ok", "load_seconds": round(load_seconds, 3), "ms_per_image": round(1000.0 * seconds / batch, 3)}


def main(argv: list[str]) -> int:
    folder, weights, height, width, batch = Path(argv[0]), argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    _block_sockets()
    try:
        result = _run(folder, weights, height, width, batch)
    except BaseException as exc:  # noqa: BLE001 - report, never die silently
        result = {"stage": "crash", "error": _error(exc), "trace": traceback.format_exc()[-2000:]}
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
