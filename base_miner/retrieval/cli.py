"""`bitmind-index`: build a retrieval index of public real images, or audit how much of a real stream it recognises.

    bitmind-index build --dataset ../shared/data/diverse/train.parquet --dataset bitmind/open-images-v7?label=0 \
        --negatives ../shared/data/diverse/extra.parquet?label=1 --out indexes/public
    bitmind-index audit --index indexes/public --dataset bitmind/open-images-v7 --rows 500

Wiring only: the index lives in `base_miner.retrieval`; the challenges (augmentation levels, 256² JPEG) are the
validator's own code, imported here so that `base_miner` itself never depends on `validator`.
"""

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from base_miner.retrieval.builder import BuildOptions, Challenge, build_index
from base_miner.training.cli import run_command
from bitmind.atomic import atomic_write_bytes
from bitmind.image_codec import ImageDecodeError, decode_image, encode_image

__all__ = ["build_parser", "main", "validator_challenge"]

log = logging.getLogger("bitmind-index")


def _unmute_loggers() -> None:
    """Importing bittensor (validator.forward does) sets every logger that exists by then to CRITICAL; ours among
    them would go silent, so give them back their configured level."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] in ("base_miner", "bitmind", "bitmind-index"):
            logger.setLevel(logging.NOTSET)


def validator_challenge(jpeg_quality: int | None = None) -> tuple[Challenge, tuple[int, ...]]:
    """(image, rng, level) -> the challenge a validator sends (its augmenter, then its 256² JPEG), and the levels."""
    from validator.augment import LEVELS, Augmenter
    from validator.forward import CHALLENGE_SIZE, DEFAULT_JPEG_QUALITY

    _unmute_loggers()
    augmenter = Augmenter(size=CHALLENGE_SIZE)
    quality = DEFAULT_JPEG_QUALITY if jpeg_quality is None else jpeg_quality

    def challenge(image: Image.Image, rng: np.random.Generator, level: int) -> Image.Image:
        augmented, _ = augmenter(image, rng, level=level)
        return decode_image(encode_image(augmented, size=CHALLENGE_SIZE, quality=quality))

    return challenge, tuple(LEVELS)


def _count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return parse


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be in 1..100, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitmind-index", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = BuildOptions()

    build = commands.add_parser("build", help="index the real images of datasets (resumable)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    build.add_argument("--dataset", action="append", required=True, metavar="DATASET",
                       help="data to index, as for bitmind-train/arena: parquet file/folder, imagefolder (real/, fake/) or hub "
                            "id, optionally :SPLIT and ?KEY=VALUE; label 0 rows are indexed, label 1 rows become "
                            "calibration negatives; a dataset without a label column needs ?label=0 (every row real); "
                            "repeatable")  # fmt: skip
    build.add_argument("--negatives", action="append", default=[], metavar="DATASET",
                       help="images NOT in the index (generated, or real from elsewhere), every row a calibration "
                            "negative for the match rule; repeatable")  # fmt: skip
    build.add_argument("--out", required=True, help="index folder; an unfinished build there is resumed")
    build.add_argument("--chunk-rows", type=_count(1), default=defaults.chunk_rows,
                       help="rows per saved chunk: the most work an interruption loses")
    build.add_argument("--max-negatives", type=_count(1), default=defaults.max_negatives,
                       help="calibration negatives kept, the first ones met in dataset order")
    build.add_argument("--calibration-images", type=_count(1), default=defaults.calibration_images,
                       help="indexed images turned into challenges at every augmentation level to measure recall")
    build.add_argument("--jpeg-quality", type=_quality, default=None,
                       help="JPEG quality of the calibration challenges (default: the validator's)")
    build.add_argument("--seed", type=int, default=defaults.seed, help="seed of the calibration challenges")

    audit = commands.add_parser("audit", help="share of a real stream the index recognises, per augmentation level",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    audit.add_argument("--index", required=True, help="index folder written by `bitmind-index build`")
    audit.add_argument("--dataset", action="append", required=True, metavar="DATASET",
                       help="real source as the validator's --validator.real_datasets takes it (hub id, parquet, image "
                            "folder, 'packaged', with ?split=&labels=... options); repeatable")  # fmt: skip
    audit.add_argument("--rows", type=_count(1), default=500, help="real images drawn from each dataset's stream")
    audit.add_argument("--augment-probs", default=None,
                       help="level weights LEVEL:WEIGHT,... of --validator.augment_probs for the mixed share "
                            "(default: the validator's)")  # fmt: skip
    audit.add_argument("--jpeg-quality", type=_quality, default=None,
                       help="JPEG quality of the challenges (default: the validator's)")
    audit.add_argument("--seed", type=int, default=0, help="seed of the stream shuffle and the augmentations")
    audit.add_argument("--report", default=None, help="also write the result as JSON to this file")

    for sub in (build, audit):
        sub.add_argument("--device", default="cpu", help="torch device of the descriptor (cpu, cuda, ...)")
        sub.add_argument("--threads", type=_count(1), default=None, help="torch CPU threads (default: torch's)")
    return parser


def _open_streams(text: str, seed: int) -> list[tuple[Any, Any]]:
    """(spec, stream) of each validator real source in `text`; ValueError names a source that cannot be opened."""
    from validator.challenges import parse_dataset_list

    streams = []
    for spec in parse_dataset_list(text):
        try:
            streams.append((spec, spec.open_stream(seed)))
        except Exception as exc:  # datasets raises many types (missing file, hub, bad column); all mean "no rows"
            raise ValueError(f"cannot open real source {spec.id!r}: {type(exc).__name__}: {exc}") from None
    return streams


def _real_images(streams: list[tuple[Any, Any]], rows: int, skipped: dict[str, int]) -> Iterator[Image.Image]:
    """Up to `rows` images of each stream, filtered and decoded as the validator does; unreadable rows are counted."""
    from validator.challenges.real import RealImageSource, decode_row_image

    # The validator shrinks real images to its RealImageSource's max_side before augmenting them.
    max_side = inspect.signature(RealImageSource).parameters["max_side"].default
    for spec, stream in streams:
        taken = 0
        for position, row in enumerate(stream):
            if taken >= rows:
                break
            if not spec.accepts(row):
                continue
            try:
                image = decode_row_image(row.get(spec.image_column), max_side=max_side)
            except ImageDecodeError as exc:  # the codec maps every unreadable cell to it
                skipped["unreadable"] += 1
                log.warning("%s row %d is unreadable (%s); skipped", spec.id, position, exc)
                continue
            taken += 1
            yield image
        if taken == 0:
            log.warning("%s gave no readable image", spec.id)


def _run_build(args: argparse.Namespace) -> dict[str, Any]:
    from base_miner.retrieval.descriptor import Descriptor

    challenge, levels = validator_challenge(args.jpeg_quality)
    options = BuildOptions(chunk_rows=args.chunk_rows, max_negatives=args.max_negatives,
                           calibration_images=args.calibration_images, seed=args.seed)  # fmt: skip
    return build_index(args.dataset, args.out, Descriptor(device=args.device), challenge, levels,
                       negatives=args.negatives, options=options)  # fmt: skip


def _run_audit(args: argparse.Namespace) -> dict[str, Any]:
    from base_miner.retrieval.audit import audit
    from base_miner.retrieval.expert import RetrievalExpert
    from validator.augment import DEFAULT_LEVEL_PROBS, parse_level_probs

    level_probs = parse_level_probs(args.augment_probs) if args.augment_probs else DEFAULT_LEVEL_PROBS
    challenge, levels = validator_challenge(args.jpeg_quality)
    expert = RetrievalExpert.load(args.index, device=args.device)
    sources = {text: _open_streams(text, args.seed) for text in args.dataset}
    results = {}
    for text, streams in sources.items():
        skipped = {"unreadable": 0}
        images = _real_images(streams, args.rows, skipped)
        result = audit(expert, images, challenge, levels, level_probs, args.seed) | skipped
        results[text] = result
        shares = ", ".join(f"level {level} {share:.1%}" for level, share in result["recognised"].items())
        log.info("audit %s: %d real images (%d unreadable skipped); recognised: %s; at the level mix %s: %.1f%%",
                 text, result["images"], result["unreadable"], shares,
                 ",".join(f"{k}:{v}" for k, v in level_probs.items()), 100 * result["mix"])  # fmt: skip
    if args.report:
        atomic_write_bytes(Path(args.report), json.dumps(results, indent=2).encode())
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run = _run_build if args.command == "build" else _run_audit
    interrupted = "interrupted; run the same command again to resume the build" if args.command == "build" else "interrupted"
    return run_command(run, args, log, interrupted)


if __name__ == "__main__":
    sys.exit(main())
