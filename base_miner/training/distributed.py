"""`bitmind-train` across processes with Hugging Face accelerate: one process per GPU (or CPU process under
`accelerate launch` / torchrun), any number of machines.

Every process computes the same global epoch plan (rows drawn from `(seed, epoch)`); a global step of `batch_size`
planned samples is split into `accumulation` micro-batches of `world` equal shares, and process `r` trains on
share `r` of each micro-batch. Sample `k` of the plan is augmented from `(seed, epoch, k)` whichever process
takes it, so the samples, the balancing and the averaged gradient of a step do not depend on the world size (batch
norm statistics are per micro-batch, as in any data-parallel run without synced batch norm).

Failures must not leave the other processes waiting: collectives time out (`timeout_s`), and set-up problems of
one process (a dataset shard it cannot read, a state file it cannot see) are gathered so that every process stops
with the same clear error.
"""

import os
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import nn

from base_miner.registry import ConfigError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "LossModule",
    "StartupError",
    "check_consistent",
    "launched_rank",
    "make_accelerator",
    "micro_batch_size",
    "process_positions",
]

DEFAULT_TIMEOUT_S = 600.0


class StartupError(ConfigError):
    """A process could not start (or disagrees with the others); raised on every process with the same text."""


def launched_rank() -> int:
    """This process's global rank as the launcher (torchrun, accelerate launch, MPI) states it; 0 when unlaunched.
    Read from the environment so logging can be set up before the process group exists."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def make_accelerator(device: str | None, amp: bool, accumulation: int, timeout_s: float):
    """An `accelerate.Accelerator` for this run: fp16 autocast + loss scaling on CUDA when `amp`, CPU processes
    talking over gloo when there is no GPU (or `device` is cpu), collectives that give up after `timeout_s`.

    Device placement stays ours: a plain run honours `--device cuda:1`, a launched one uses the launcher's device.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if not timeout_s > 0:
        raise ConfigError(f"the collective timeout must be > 0 seconds, got {timeout_s}")
    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu,
        mixed_precision="fp16" if amp and not cpu else "no",
        gradient_accumulation_steps=accumulation,
        device_placement=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
    )


def micro_batch_size(batch_size: int, world: int, accumulation: int) -> int:
    """Images each process takes per micro-batch; a global batch that does not split evenly is a start-up error
    (an uneven split would make the averaged gradient depend on the world size)."""
    if accumulation < 1:
        raise ConfigError(f"gradient accumulation must be >= 1 micro-batch, got {accumulation}")
    parts = world * accumulation
    if batch_size % parts:
        raise ConfigError(
            f"--batch-size {batch_size} does not split into {world} process(es) x {accumulation} accumulation "
            f"step(s); use a multiple of {parts}"
        )
    return batch_size // parts


def process_positions(first_step: int, end_step: int, batch_size: int, world: int, rank: int,
                      accumulation: int) -> np.ndarray:  # fmt: skip
    """Plan positions process `rank` trains on for global steps [first_step, end_step), in training order:
    per step, its share of micro-batch 0, then of micro-batch 1, ..."""
    micro = micro_batch_size(batch_size, world, accumulation)
    steps = np.arange(first_step, end_step)[:, None, None] * batch_size
    shares = (np.arange(accumulation)[None, :, None] * world + rank) * micro
    return (steps + shares + np.arange(micro)[None, None, :]).reshape(-1)


def check_consistent(accelerator, error: str | None, summary: Any, what: str) -> None:
    """Gather every process's set-up outcome; raise `StartupError` on all of them when one failed (`error`) or
    when their `summary` of `what` differs (e.g. one machine reads other files than the rest)."""
    from accelerate.utils import gather_object

    reports = gather_object([(accelerator.process_index, error, summary)])
    failed = [f"process {rank}: {message}" for rank, message, _ in reports if message]
    if failed:
        raise StartupError("; ".join(failed))
    summaries = {rank: value for rank, _, value in reports}
    if len({repr(value) for value in summaries.values()}) > 1:
        detail = ", ".join(f"process {rank}: {value}" for rank, value in sorted(summaries.items()))
        raise StartupError(f"the processes disagree on {what} ({detail}); every process must see the same")


class LossModule(nn.Module):
    """A detector's training loss as a module's forward.

    Data parallelism exchanges gradients only for what runs through the wrapped module's forward, and detectors
    compute their loss through their own methods (UCF's `disentangle`); wrapping the loss call keeps every
    detector's loss, extras included, unchanged while the wrapper holds exactly the detector's parameters.
    """

    def __init__(self, detector) -> None:
        super().__init__()
        self.model = detector.model
        self._loss = detector.training_loss

    def forward(self, batch: torch.Tensor, labels: torch.Tensor, **extras: Any) -> torch.Tensor:
        return self._loss(batch, labels, **extras)
