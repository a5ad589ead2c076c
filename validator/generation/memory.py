"""The generator's memory plan: how much the diffusion pool may hold, and whether the captioner and rewriter leave
the GPU while images are made.

The plan is made once at start, AFTER the captioner and rewriter are loaded on the device, so the free memory it
measures already excludes them:

- CUDA: with no explicit budget, the pool may use 95 % of the GPU memory free beside the captioner and rewriter when
  the largest configured model (its `vram_gb`; a model without one counts as 0, its size is known only once loaded)
  fits there; all three then stay resident. When it does not fit, the
  captioner and rewriter are swapped: they wait in host RAM while a round's images are made and come back (the
  diffusion pipelines moving to host RAM meanwhile) while the next round's prompts are made, so one swap is paid per
  round, not per image. The budget is then 95 % of the free memory plus what the two occupy. An explicit budget is
  used as given, and the two are swapped when it does not fit in 95 % of the memory free beside them.
- CUDA with model CPU offload: the diffusion weights live in host RAM, so the budget counts host RAM (80 % of what is
  available); the captioner and rewriter are swapped too, since offloading says the GPU is short.
- CPU: every model shares host RAM and moving to the CPU is a no-op: the budget is 80 % of the available host RAM,
  nothing is swapped.
"""

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch is imported where it is used, like every heavy library of this package
    import torch

__all__ = [
    "GPU_SHARE",
    "HOST_SHARE",
    "MemoryPlan",
    "Residency",
    "free_memory_gb",
    "modules_gb",
    "plan_memory",
]

log = logging.getLogger(__name__)

GPU_SHARE = 0.95  # of free GPU memory; the rest covers the CUDA context growth and allocator fragmentation
HOST_SHARE = 0.8  # of available host RAM; the rest stays for the OS, datasets and the validator beside us


def free_memory_gb(device: "torch.device") -> float:
    """Free memory now: the GPU's for a CUDA device, available host RAM otherwise."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return free / 1e9
    import psutil

    return psutil.virtual_memory().available / 1e9


def modules_gb(modules: Iterable["torch.nn.Module"]) -> float:
    """Bytes of the parameters and buffers of `modules`, in GB (a tensor shared between modules counted once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values()) / 1e9


@dataclass(frozen=True)
class MemoryPlan:
    """The outcome of `plan_memory`; `describe()` is the start-up log line."""

    budget_gb: float
    swap_helpers: bool
    memory: str  # what the budget counts: "GPU memory" or "host RAM"
    free_gb: float  # of that memory, measured after the captioner and rewriter were loaded
    helpers_gb: float
    largest_model_gb: float
    explicit_budget: bool

    def describe(self) -> str:
        helpers = (
            "swapped (host RAM while images are made, device while prompts are made)" if self.swap_helpers
            else "resident" if self.helpers_gb else "none loaded"
        )
        return (
            f"memory plan: {self.free_gb:.1f} GB {self.memory} free after loading the captioner and rewriter "
            f"({self.helpers_gb:.2f} GB); largest model {self.largest_model_gb:.1f} GB; diffusion budget "
            f"{self.budget_gb:.1f} GB ({'set by flag' if self.explicit_budget else 'measured'}); captioner and "
            f"rewriter {helpers}"
        )


def plan_memory(
    device: "torch.device",
    helpers_gb: float,
    largest_model_gb: float,
    budget_gb: float | None = None,
    cpu_offload: bool = False,
    measure: Callable[["torch.device"], float] | None = None,
) -> MemoryPlan:
    """Decide the pool's budget and whether to swap the captioner/rewriter (see the module docstring).

    Call it once the captioner and rewriter are on the device: `measure` (default `free_memory_gb`) is read now.
    """
    import torch

    measure = measure or free_memory_gb
    explicit = bool(budget_gb and budget_gb > 0)
    has_helpers = helpers_gb > 0
    if device.type != "cuda" or cpu_offload:
        free = measure(torch.device("cpu"))
        budget = budget_gb if explicit else HOST_SHARE * free
        swap = device.type == "cuda" and has_helpers
        return MemoryPlan(budget, swap, "host RAM", free, helpers_gb, largest_model_gb, explicit)
    free = measure(device)
    beside = GPU_SHARE * free
    if explicit:
        swap = has_helpers and budget_gb > beside
        budget = budget_gb
        reachable = GPU_SHARE * (free + helpers_gb) if swap else beside
        if budget > reachable:
            log.warning("--generator.vram_budget_gb %.1f is above the %.1f GB the GPU can give the diffusion "
                        "models; expect out-of-memory errors", budget, reachable)
    else:
        swap = has_helpers and largest_model_gb > beside
        budget = GPU_SHARE * (free + helpers_gb) if swap else beside
    return MemoryPlan(budget, swap, "GPU memory", free, helpers_gb, largest_model_gb, explicit)


class Parkable(Protocol):
    def park(self) -> None: ...


class Residency:
    """Moves the captioner and rewriter between the device and host RAM when the plan swaps them.

    `for_prompts()` before a round's prompts (the pool parks its pipelines in host RAM first), `for_images()` before
    its images. Both are no-ops when the plan keeps everything resident. The helpers start on the device.
    """

    def __init__(self, plan: MemoryPlan, device: "torch.device | str", helpers: Sequence["torch.nn.Module"],
                 pool: Parkable) -> None:
        import torch

        self.plan = plan
        self.device = torch.device(device)
        self.helpers = list(helpers)
        self.pool = pool
        self.on_device = True

    def for_prompts(self) -> None:
        if not self.plan.swap_helpers or self.on_device:
            return
        self.pool.park()
        self._move(self.device, "to make prompts")
        self.on_device = True

    def for_images(self) -> None:
        if not self.plan.swap_helpers or not self.on_device:
            return
        self._move("cpu", "while images are made")
        self.on_device = False

    def _move(self, target: "torch.device | str", why: str) -> None:
        import torch

        target = torch.device(target)
        start = time.perf_counter()
        for module in self.helpers:
            module.to(target)
        if target.type == "cpu" and self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("moved captioner and rewriter (%.2f GB) to %s %s in %.1f s",
                 self.plan.helpers_gb, target, why, time.perf_counter() - start)
