"""bitmind-localnet's flags, and the demo's defaults they show.

Why a module of its own: `python -m neurons.flagdoc` and the tests read the parser without starting anything.
"""

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

# camo_thumbnails: CAMO with the route for the up-scaled 32² samples this demo's validator sends (camo answers
# them near chance; see base_miner/configs/camo_thumbnails.yaml)
DEFAULT_MINERS = "camo_thumbnails,npr,baseline"
DEFAULT_AUGMENT_PROBS = "0:0.5,1:0.5"
DEFAULT_ROUNDS = 40  # EMA scores (alpha 0.05) reach 87 % of their steady value: the ranking has settled
SEMI_SEED_ITEMS = 60  # spliced semi-synthetic items seeded with --semi-synthetic
SEMI_MIX = "0.5,0.25,0.25"  # real, synthetic, semi-synthetic challenges with --semi-synthetic
VIDEO_SEED_CLIPS = 40  # generated clips of --video-data cached for the validator at start with --video-share


def _number(kind: type, minimum: float, strict: bool) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` above (`strict`) or at least `minimum`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number ({kind.__name__}), got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            bound = f"{'>' if strict else '>='} {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    return parse


def _video_share(text: str) -> float:
    value = _number(float, 0, strict=False)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of `bitmind-localnet` (flags and defaults as documented in the README's flag table)."""
    parser = argparse.ArgumentParser(
        prog="bitmind-localnet",
        description="Run a whole subnet-34 network on 127.0.0.1 (CPU, offline): a local chain, miners, a validator "
        "and a generator, with a live leaderboard.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--miners",
        default=DEFAULT_MINERS,
        help="Comma list of miner detectors: packaged config names (camo, npr, generalist, ucf, baseline, "
        "baseline_random) or detector YAML files; one miner process each. A CAMO entry with the suffix +index "
        "(camo+index) also looks challenges up in a retrieval index of the validator's real sample (see --index).",
    )
    parser.add_argument(
        "--rounds",
        type=_number(int, 0, strict=False),
        default=DEFAULT_ROUNDS,
        help="Stop after the validator has scored this many challenges, exactly: the validator is started with "
        "--neuron.max_steps of the same number (0: run until Ctrl-C).",
    )
    parser.add_argument("--summary", type=Path, default=None, help="Write the final leaderboard as JSON here.")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="Empty or new folder for the chain, wallets, caches, state and logs; kept afterwards "
        "(default: a fresh temporary folder, removed at the end unless --keep).",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the temporary work folder.")
    parser.add_argument(
        "--seconds-per-block", type=_number(float, 0, strict=True), default=1.0, help="Block time of the local chain."
    )
    parser.add_argument(
        "--epoch-length",
        type=_number(int, 0, strict=True),
        default=5,
        help="Blocks between the validator's weight settings; the local chain's weights_rate_limit is one less, "
        "since the chain accepts weights once strictly more blocks than the limit have passed.",
    )
    parser.add_argument(
        "--step-interval",
        type=_number(float, 0, strict=False),
        default=0.5,
        help="Seconds between the starts of two validator steps.",
    )
    parser.add_argument(
        "--query-timeout",
        type=_number(float, 0, strict=True),
        default=9.0,
        help="Seconds the validator waits for a miner's answer.",
    )
    parser.add_argument(
        "--augment-probs",
        default=DEFAULT_AUGMENT_PROBS,
        help="Validator augmentation levels (--validator.augment_probs). The shipped sample images are 32x32 CIFAKE "
        "photos; levels 2-3 (JPEG, noise, blur on an 8x up-scaled image) leave little any detector can see, so the "
        "demo uses levels 0-1; pass 0:0.1,1:0.3,2:0.3,3:0.3 for the validator's default.",
    )
    parser.add_argument(
        "--startup-timeout",
        type=_number(float, 0, strict=True),
        default=300.0,
        help="Seconds each start-up phase may take (miners serving, validator running) before giving up.",
    )
    parser.add_argument(
        "--seed",
        type=_number(int, 0, strict=False),
        default=None,
        help="Seed of the validator's and the generator's random draws, for repeatable runs (default: fresh).",
    )
    parser.add_argument(
        "--fake-sample",
        type=Path,
        default=None,
        help="Folder of AI-generated images to seed the synthetic cache with (default: the packaged sample).",
    )
    parser.add_argument(
        "--index",
        type=Path,
        default=None,
        help="Retrieval index folder of the +index miners: reused when it holds a complete index, otherwise built "
        "there at start (bitmind-index build) from the packaged real sample, with the AI-generated sample as the "
        "match rule's negatives (default: built in the work folder).",
    )
    parser.add_argument(
        "--semi-synthetic",
        action="store_true",
        help=f"Also send semi-synthetic challenges (mix {SEMI_MIX} of real, synthetic, semi-synthetic): real sample "
        f"images with a region of an AI-generated sample image pasted in through a soft mask ({SEMI_SEED_ITEMS} "
        "made at start; the demo has no inpainting model). The board shows accuracy per kind.",
    )
    parser.add_argument(
        "--video-share",
        type=_video_share,
        default=0.0,
        help="Share of challenges that are video clips (and the video weight of the reward), from --video-data: "
        f"its real clips are the validator's real videos, {VIDEO_SEED_CLIPS} of its generated clips seed the "
        "generated-clip cache. Miners answer with their video detector. 0: images only.",
    )
    parser.add_argument(
        "--video-detector",
        default="tall",
        help="Video detector every miner serves with --video-share (--neuron.video_detector: a packaged config name, "
        "a YAML file, or none to answer clips with -1); without --video-share miners load none.",
    )
    parser.add_argument(
        "--video-data",
        type=Path,
        default=None,
        help="Folder of clips with a metadata.csv (path and label columns, 0 real / 1 generated) for --video-share "
        "(default: shared/data/video beside the project folder).",
    )
    parser.add_argument(
        "--tolerate-miner-exit",
        action="store_true",
        help="A miner that exits keeps its uid and just stops answering (its score decays) instead of ending "
        "the run.",
    )
    return parser
