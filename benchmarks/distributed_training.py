"""Benchmark: `bitmind-train` throughput on 1 vs 2 processes and the communication each step adds.

Each run is the real trainer launched the way operators launch it (`accelerate launch --multi_gpu --num_processes
N`; on a machine without GPUs these are CPU processes talking over gloo) on `cifake-mini`, TinyCNN at 32², one
epoch of `--steps` global steps of `--batch` images, one torch thread per process, no validation. Printed per
world size: training images/s (all processes, from the first step to the last, start-up excluded), and the
per-step communication: the time of one all-reduce of a gradient-sized float32 tensor (what data parallelism adds
to a step) plus the loss all-reduce the trainer does per micro-batch, each the median of 20.

On 2 shared CPU cores the second process competes with the first for the same cores: expect little or no gain
there; the figure that carries over to GPUs is the communication time relative to a step.

    .venv/bin/python benchmarks/distributed_training.py [--steps 12] [--batch 32]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifake-mini" / "train.parquet"
RESULT = "BENCH_RESULT "


def _worker(steps: int, batch: int, out: str) -> None:
    """Inside `accelerate launch`: train, then time the collectives; process 0 prints one JSON line."""
    import torch

    from base_miner.training.trainer import TrainConfig, Trainer

    config = TrainConfig(detector="tiny_cnn", overrides={"image_size": 32, "weights": None},
                         train=[f"{DATA}:train[:512]"], out=out, epochs=1, samples_per_epoch=steps * batch, batch_size=batch, lr=1e-3, warmup=0.0,
                         augment=0.5, threads=1, save_every=10**6)  # fmt: skip
    trainer = Trainer(config)
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    trainer.fit()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    gradient = torch.zeros(sum(p.numel() for p in trainer.detector.model.parameters()))
    loss = torch.zeros(3)

    def median_ms(tensor: torch.Tensor) -> float:
        times = []
        for _ in range(20):
            start = time.perf_counter()
            accelerator.reduce(tensor, "sum")
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    result = {"processes": accelerator.num_processes, "images_per_s": steps * batch / seconds,
              "step_ms": 1000 * seconds / steps, "gradient_allreduce_ms": median_ms(gradient),
              "loss_allreduce_ms": median_ms(loss), "parameters": gradient.numel()}  # fmt: skip
    if accelerator.is_main_process:
        print(RESULT + json.dumps(result), flush=True)


def _launch(processes: int, steps: int, batch: int) -> dict:
    from bitmind.ports import free_port

    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), __file__, "--worker", "--steps", str(steps), "--batch",
                   str(batch), "--out", out]  # fmt: skip
        if processes == 1:  # a plain command: accelerate refuses --multi_gpu with one process
            command = [sys.executable, __file__, "--worker", "--steps", str(steps), "--batch", str(batch), "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="global steps per run")
    parser.add_argument("--batch", type=int, default=32, help="global batch (images per step)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.steps, args.batch, args.out)
        return
    print(f"TinyCNN 32², cifake-mini, {args.steps} steps of {args.batch} images, one torch thread per process")
    print(f"{'processes':>9} {'images/s':>9} {'step ms':>8} {'grad all-reduce ms':>19} {'loss all-reduce ms':>19}")
    for processes in (1, 2):
        r = _launch(processes, args.steps, args.batch)
        print(f"{r['processes']:>9} {r['images_per_s']:>9.1f} {r['step_ms']:>8.1f} {r['gradient_allreduce_ms']:>19.2f} "
              f"{r['loss_allreduce_ms']:>19.2f}   ({r['parameters']} parameters)")  # fmt: skip


if __name__ == "__main__":
    main()
