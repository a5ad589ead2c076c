"""`bitmind-train`: train a registered detector from its YAML config on one or more datasets.

Example (NPR on CIFAKE and `diverse`, holding out one real source and one generator for validation):

    bitmind-train --detector npr --train ../shared/data/cifake:train[:90%] --train ../shared/data/diverse \
        --val ../shared/data/cifake:train[90%:] --holdout source=urban100-sun80 \
        --holdout generator=ai-horde-checkpoints-sdxl-sd15 --crop-size 64 --epochs 4 --out runs/npr
"""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from base_miner.registry import ConfigError
from base_miner.training.augment import DEFAULT_OPERATIONS, OPERATIONS, parse_operations
from base_miner.training.data import DataError, parse_selector
from base_miner.training.distributed import DEFAULT_TIMEOUT_S, launched_rank
from base_miner.training.trainer import TrainConfig, Trainer
from bitmind.arg_types import positive

__all__ = ["build_parser", "main", "parse_overrides", "run_command"]

log = logging.getLogger("bitmind-train")


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` config overrides; VALUE is read as YAML (`64`, `true`, `[0.5, 0.5, 0.5]`)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} must be KEY=VALUE")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
    return overrides


def run_command(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace, logger: logging.Logger,
                interrupted: str = "interrupted") -> int:  # fmt: skip
    """Shared ending of the fitting commands: exit 2 with one log line on bad input, 1 with one line when a file
    cannot be read or written (an --out under a file, a full disk), 130 on Ctrl-C, else 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except (ConfigError, DataError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    except OSError as exc:
        logger.error("%s: %s", type(exc).__name__, exc)
        return 1
    except KeyboardInterrupt:
        logger.warning("%s", interrupted)
        return 130
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitmind-train", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--detector", required=True, help="detector config: YAML path or packaged name (npr, generalist, ucf, face_expert)")
    data.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key (value parsed as YAML), e.g. --set image_size=64; repeatable")
    data.add_argument("--train", action="append", required=True, metavar="DATASET",
                      help="training data: parquet file/folder, imagefolder (real/, fake/) or hub id, optionally :SPLIT (e.g. :train[:9000]) and ?KEY=VALUE row selection (clip datasets: a part frames=N makes each clip N frame images); repeatable")
    data.add_argument("--val", action="append", default=[], metavar="DATASET", help="validation dataset (same forms); repeatable")
    data.add_argument("--holdout", action="append", default=[], metavar="KEY=VALUE",
                      help="remove rows whose source/generator/label equals VALUE from training and validate on them (held-out sources); repeatable")
    data.add_argument("--face-crops", action="store_true", help="train and validate on the face gate's aligned crops (the CAMO face expert)")
    data.add_argument("--gate-config", default="camo", help="CAMO config whose gate makes the face crops")
    data.add_argument("--streaming", action="store_true",
                      help="read --train datasets as datasets streams (hub scale, never stored whole; each process its part); needs --samples-per-epoch, whole splits, no --holdout/--face-crops")
    data.add_argument("--shuffle-buffer", type=positive(int), default=1000, help="rows in each stream's shuffle buffer (--streaming)")
    data.add_argument("--val-max", type=positive(int), default=1000, help="cap on rows per validation set (stratified, seeded)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive(int), default=5, help="passes of --samples-per-epoch samples")
    optim.add_argument("--samples-per-epoch", type=positive(int), default=None, help="samples drawn per epoch (default: the training set size)")
    optim.add_argument("--batch-size", type=positive(int), default=32, help="images per optimisation step")
    optim.add_argument("--crop-size", type=positive(int), default=None, help="side of the random training crops (default: the config's image_size)")
    optim.add_argument("--lr", type=positive(float), default=1e-4, help="peak AdamW learning rate")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decoupled weight decay")
    optim.add_argument("--warmup", type=_fraction, default=0.1, help="fraction of the steps spent warming up linearly")
    optim.add_argument("--augment", type=_fraction, default=0.5, help="augmentation strength: mean number of times each operation is applied")
    optim.add_argument("--augment-ops", default=",".join(DEFAULT_OPERATIONS), help=f"comma-separated operations to draw from, of {', '.join(OPERATIONS)}; challenge (the validator's challenge transform, brought back to the image's size), noise and sharpen are opt-in")
    optim.add_argument("--seed", type=int, default=0, help="seeds initialisation, sampling and augmentation: same seed, same run")
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="run folder: best/ and last/ checkpoints, trainer state, metrics.jsonl")
    run.add_argument("--resume", action="store_true", help="continue from OUT/trainer_state.pt")
    run.add_argument("--max-steps", type=positive(int), default=None, help="stop (resumably) after this global step")
    run.add_argument("--save-every", type=positive(int), default=200, help="steps between trainer-state saves")
    run.add_argument("--save-dtype", choices=("float32", "float16"), default="float32", help="dtype of saved checkpoint weights")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    run.add_argument("--no-amp", action="store_true", help="disable fp16 mixed precision on CUDA")
    run.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads")
    run.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    dist = parser.add_argument_group("several processes (accelerate launch / torchrun; see docs/TRAINING.md)")
    dist.add_argument("--grad-accum", type=positive(int), default=1,
                      help="micro-batches per optimisation step; --batch-size must split into processes x this")
    dist.add_argument("--dist-timeout", type=positive(float), default=DEFAULT_TIMEOUT_S,
                      help="seconds a process waits for the others in a collective before the run fails")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    for text in args.holdout:
        parse_selector(text)  # fail before loading anything
    ops = parse_operations(args.augment_ops)
    return TrainConfig(
        detector=args.detector, train=args.train, val=args.val, holdout=args.holdout, out=args.out,
        overrides=parse_overrides(args.overrides), epochs=args.epochs, samples_per_epoch=args.samples_per_epoch,
        batch_size=args.batch_size, crop_size=args.crop_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup=args.warmup, augment=args.augment, augment_ops=ops, face_crops=args.face_crops,
        gate_config=args.gate_config, val_max=args.val_max, seed=args.seed, device=args.device, amp=not args.no_amp,
        save_every=args.save_every, save_dtype=args.save_dtype, resume=args.resume, max_steps=args.max_steps,
        threads=args.threads, workers=max(0, args.workers), accumulation=args.grad_accum,
        timeout_s=args.dist_timeout, streaming=args.streaming, shuffle_buffer=args.shuffle_buffer,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = launched_rank()  # processes other than the first log only warnings and errors, tagged with their rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s {f'[process {rank}] ' if rank else ''}%(name)s: %(message)s")
    trainer = None
    try:
        trainer = Trainer(config_from_args(args))
        metrics = trainer.fit()
    except (ConfigError, DataError, ValueError, FloatingPointError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        if trainer is not None:
            trainer.save_state(collective=False)  # the main process writes it; the others may be gone already
            log.warning("interrupted at step %d; state saved, continue with --resume", trainer.step)
        return 130
    log.info("done at step %d; checkpoints in %s (best, last); final metrics %s", trainer.step, args.out, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
