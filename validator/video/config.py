"""The validator's video flags and the video challenge sampler they describe.

`--validator.video_share` (in `validator.scoring`, since it also weighs the reward) says how often a step sends a
clip; these flags say where clips come from and how they are sent. With a share of 0 nothing of this is built.
"""

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitmind.config import DEFAULT_HOME
from validator.augment import Augmenter, parse_level_probs
from validator.challenges.dataset_spec import parse_dataset_list
from validator.video.augment import ClipAugmenter
from validator.video.challenge import VideoChallengeSampler
from validator.video.sources import DEFAULT_REAL_VIDEO_DATASETS, SyntheticVideoSource, VideoClipSource

__all__ = ["VideoChallenges", "add_video_args", "build_video_challenges", "check_video_config"]

log = logging.getLogger(__name__)

DEFAULT_VIDEO_QUALITY = 75  # the clip codec's JPEG-like quality: the same fidelity as the image challenges


@dataclass
class VideoChallenges:
    """What a step needs for video: the sampler, the share of steps that send a clip, the codec quality, and the
    real-clip source whose background filler the caller starts and stops."""

    sampler: VideoChallengeSampler
    share: float
    quality: int
    real: VideoClipSource


def add_video_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the video sources and clip encoding."""
    add = parser.add_argument
    add("--validator.real_video_datasets", type=str, default=",".join(DEFAULT_REAL_VIDEO_DATASETS),
        help="Real videos: comma list of hub dataset ids (zip archives of videos, read by range requests), local "
             "folders (videos, zips, or a metadata.csv with a path column; ?labels=0 keeps its label-0 rows) or "
             "local zips (see validator/video/sources.py).")
    add("--validator.real_video_cache", type=str, default=str(DEFAULT_HOME / "validator" / "real_video_cache"),
        help="Folder where real clips are cached by the background filler.")
    add("--validator.real_video_cache_max_gb", type=float, default=5.0,
        help="Size cap of the real-clip cache (split evenly between the datasets); oldest clips go first.")
    add("--validator.synthetic_video_cache", type=str,
        default=str(DEFAULT_HOME / "validator" / "synthetic_video_cache"),
        help="Folder of the generated-clip cache the generator writes (read only here); video challenges are sent "
             "only while it holds clips. Empty: no video challenges.")
    add("--validator.video_quality", type=int, default=DEFAULT_VIDEO_QUALITY,
        help="Quality (1-100, JPEG-like) of the clips sent to miners (bitmind.video_codec).")


def check_video_config(config: Any) -> list[str]:
    """Why the video flags cannot work (one message per problem); empty when they can."""
    validator = config.validator
    problems = []
    if not 0.0 <= validator.video_share <= 1.0:
        problems.append(f"--validator.video_share must be in [0, 1], got {validator.video_share}")
    if not 1 <= validator.video_quality <= 100:
        problems.append(f"--validator.video_quality must be in 1..100, got {validator.video_quality}")
    if not (math.isfinite(validator.real_video_cache_max_gb) and validator.real_video_cache_max_gb > 0):
        problems.append(f"--validator.real_video_cache_max_gb must be positive, got {validator.real_video_cache_max_gb}")
    try:
        parse_dataset_list(validator.real_video_datasets)
    except ValueError as error:
        problems.append(f"--validator.real_video_datasets: {error}")
    return problems


def build_video_challenges(config: Any, augment_size: int) -> VideoChallenges | None:
    """The video side the flags describe, or None with `--validator.video_share 0`."""
    validator = config.validator
    if validator.video_share <= 0:
        return None
    seed = None if validator.seed < 0 else validator.seed
    real = VideoClipSource(
        parse_dataset_list(validator.real_video_datasets),
        validator.real_video_cache,
        max_bytes=int(validator.real_video_cache_max_gb * 1e9),
        seed=seed,
    )
    synthetic = None
    if validator.synthetic_video_cache:
        synthetic = SyntheticVideoSource(Path(validator.synthetic_video_cache).expanduser())
    else:
        log.warning("no --validator.synthetic_video_cache: no generated clips, so no video challenges are sent")
    augmenter = ClipAugmenter(Augmenter(parse_level_probs(validator.augment_probs), size=augment_size))
    sampler = VideoChallengeSampler(real, synthetic, augmenter, fake_probability=validator.fake_prob)
    return VideoChallenges(sampler, float(validator.video_share), int(validator.video_quality), real)
