"""bitmind-train under the real `accelerate launch`: two CPU processes (torchrun + gloo) train the same weights as one
process with the same global batch and seed, write one checkpoint, resume on one process at the right step, and
fail together with a clear error instead of hanging when one process cannot start.

Why the single-process reference uses `--grad-accum 2`: batch norm normalises over the images one forward sees, so
two processes of 4 images each match one process doing two micro-batches of 4 (the same 8 planned images, the same
augmentation); the gradients are then the same average and the weights agree to float rounding.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from base_miner.training.distributed import micro_batch_size, process_positions
from base_miner.training.trainer import METRICS_FILE, STATE_FILE, TrainConfig, Trainer
from bitmind.ports import free_port
from tests._required import shared_data

REPO = Path(__file__).resolve().parents[1]
# Parameters after a few AdamW steps: two processes average gradients with gloo's all-reduce, one process sums two
# micro-batches; the orders of the float additions differ, nothing else does.
ATOL, RTOL = 2e-5, 1e-4
LAUNCH_TIMEOUT_S = 240  # bound on each launched run (the runs themselves take ~15-30 s on 2 busy cores)
CHILD_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
             "PYTHONUNBUFFERED": "1", "READ_ONLY": "1"}  # fmt: skip
OVERRIDES = {"image_size": 32, "width": 8, "dropout": 0.0, "weights": None}


@pytest.fixture(scope="module")
def cifake_mini() -> Path:
    return shared_data("cifake-mini/train.parquet")


def _flags(cifake_mini: Path, out: Path) -> list[str]:
    sets = [f"--set={key}={'null' if value is None else value}" for key, value in OVERRIDES.items()]
    return ["--detector", "tiny_cnn", *sets, "--train", f"{cifake_mini}:train[:64]",
            "--val", f"{cifake_mini}:train[-16:]",
            "--epochs", "2", "--samples-per-epoch", "16", "--batch-size", "8", "--lr", "3e-3", "--warmup", "0",
            "--augment", "0.5", "--threads", "1", "--seed", "3", "--out", str(out)]  # fmt: skip


def _config(cifake_mini: Path, out: Path, **keys) -> TrainConfig:
    base = dict(detector="tiny_cnn", overrides=OVERRIDES, train=[f"{cifake_mini}:train[:64]"],
                val=[f"{cifake_mini}:train[-16:]"], epochs=2, samples_per_epoch=16, batch_size=8, lr=3e-3, warmup=0.0,
                augment=0.5, threads=1, seed=3, out=str(out), device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **keys})


def launch(processes: int, args: list[str], script: list[str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N` (torchrun; on a machine without GPUs the processes are CPU
    processes on gloo) of `python -m base_miner.training.cli ARGS`, or of `script`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               *(script or ["-m", "base_miner.training.cli"]), *args]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env={**os.environ, **CHILD_ENV}, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_same_parameters(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Trainable tensors only: batch-norm running statistics are buffers, and under data parallelism they are
    process 0's (as DDP broadcasts them), not the sequential micro-batches' of one process."""
    parameters = {key for key in want if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert parameters and {key for key in got if key in parameters} == parameters
    for key in parameters:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL, msg=key)


def test_shares_of_a_global_step_cover_it_once_whatever_the_world_size():
    for world, accumulation in ((1, 1), (2, 1), (4, 2), (1, 8)):
        shares = [process_positions(3, 5, 16, world, rank, accumulation) for rank in range(world)]
        assert sorted(np.concatenate(shares).tolist()) == list(range(48, 80))
    assert process_positions(0, 1, 8, 2, 1, 1).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="does not split into 3 process"):
        micro_batch_size(8, 3, 1)


def test_two_launched_processes_train_what_one_does_and_resume_on_one(cifake_mini, tmp_path):
    # Reference: one process, the same global batch of 8 as two micro-batches of 4; 2 steps, then resumed to 4.
    reference = Trainer(_config(cifake_mini, tmp_path / "ref", accumulation=2, max_steps=2))
    initial = {key: value.clone() for key, value in reference.detector.model.state_dict().items()}
    # amp is on by default; without CUDA accelerate runs fp32 with no loss scaler (the GPU path falls back)
    assert reference.accelerator.mixed_precision == "no" and reference.accelerator.scaler is None
    reference.fit()
    ref_step2 = _weights(tmp_path / "ref" / "last")
    reference = Trainer(_config(cifake_mini, tmp_path / "ref", accumulation=2, resume=True))
    reference.fit()
    ref_step4 = _weights(tmp_path / "ref" / "last")

    run = tmp_path / "dist"
    done = launch(2, [*_flags(cifake_mini, run), "--max-steps", "2", "--dist-timeout", "120"])
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "2 process(es) x 1 accumulation x 4" in output and "per process:" in output

    # One writer: one metrics line, one checkpoint, the state at global step 2, no temp files left anywhere.
    lines = (run / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 1 and '"step": 2' in lines[0]
    assert '"n": 16' in lines[0]  # validation gathered both processes' shards of the 16 rows
    assert sorted(p.name for p in (run / "last").iterdir()) == ["config.yaml", "model.safetensors"]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    state = torch.load(run / STATE_FILE, weights_only=True)
    assert (state["step"], state["world_size"]) == (2, 2)

    dist_step2 = _weights(run / "last")
    _assert_same_parameters(dist_step2, ref_step2)
    moved = max(float((dist_step2[k] - initial[k]).abs().max()) for k in dist_step2 if k.endswith("weight"))
    assert moved > 100 * ATOL  # training changed the weights far beyond the tolerance: the match is not trivial
    ref_losses = torch.load(tmp_path / "ref" / STATE_FILE, weights_only=True)["losses"]
    np.testing.assert_allclose(state["losses"], ref_losses[:2], rtol=1e-5)  # mean over processes = over micro-batches

    # Two processes -> one: the resumed run continues at global step 2 and ends where the reference does.
    resumed = Trainer(_config(cifake_mini, run, accumulation=2, resume=True))
    assert resumed.step == 2 and resumed.scheduler.last_epoch == 2
    resumed.fit()
    assert resumed.step == 4
    _assert_same_parameters(_weights(run / "last"), ref_step4)
    assert len((run / METRICS_FILE).read_text().splitlines()) == 2


def test_a_process_whose_stream_shard_is_empty_stops_every_process_with_its_reason(cifake_mini, tmp_path):
    """A streamed dataset with fewer rows than processes: process 1's part is empty. Every process stops at start
    with process 1's reason, none waits for the others until the timeout."""
    one_row = tmp_path / "one_row.parquet"
    pq.write_table(pq.read_table(cifake_mini).slice(0, 1), one_row)
    flags = _flags(cifake_mini, tmp_path / "run")
    flags[flags.index("--train") + 1] = str(one_row)
    done = launch(2, [*flags, "--streaming", "--dist-timeout", "60"])
    output = done.stdout + done.stderr
    assert done.returncode != 0
    reason = "process 1: DataError: its part of '"
    # process 0 read its part fine, yet stops with process 1's reason (its log lines carry no process tag)
    assert any(reason in line and "one_row' holds no row" in line and "[process 1]" not in line
               for line in output.splitlines()), output[-4000:]  # fmt: skip
    assert not (tmp_path / "run" / STATE_FILE).exists()


def test_a_batch_that_does_not_split_into_micro_batches_is_refused_at_start(cifake_mini, tmp_path):
    """The same check the launched processes run at start, with the world size accelerate reports (1 here)."""
    with pytest.raises(ValueError, match="--batch-size 8 does not split into 1 process\\(es\\) x 3 accumulation"):
        Trainer(_config(cifake_mini, tmp_path, accumulation=3))


def test_the_new_flags_reach_the_config():
    from base_miner.training import cli

    args = cli.build_parser().parse_args(["--detector", "npr", "--train", "x", "--out", "o", "--grad-accum", "4",
                                          "--dist-timeout", "90", "--streaming", "--shuffle-buffer", "50"])  # fmt: skip
    config = cli.config_from_args(args)
    assert (config.accumulation, config.timeout_s, config.streaming, config.shuffle_buffer) == (4, 90.0, True, 50)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--detector", "npr", "--train", "x", "--out", "o", "--grad-accum", "0"])
