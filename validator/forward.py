"""One validator step without the process around it: choose miners, build a challenge, query, score.

`ChallengeRunner.run(view)` picks up to `sample_size` eligible miners, draws a challenge from the `ChallengeSampler`
(real or fake, augmented), encodes it as a 256² JPEG, queries every chosen miner in parallel under one timeout and
scores the answers with the `Scorer`. It measures each phase, so the benchmark and the step log line can show where a
step's time goes. Persistence, weights, syncing and the loop belong to `neurons/validator.py`.
With video challenges (`VideoChallenges`, `--validator.video_share`), that share of steps draws a clip instead
(`validator/video/`), encodes it with the clip codec, sends a `VideoSynapse` and scores it in the video history;
while no clip is cached such a step sends an image challenge.

The sampler only reads caches: it never waits for the generator (an empty synthetic cache gives a real challenge and
a warning) nor for the real-image filler (no real image yet gives None: no challenge this round).
"""

import argparse
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bittensor as bt
import numpy as np
from PIL import Image

from bitmind.chain.base import MetagraphView
from bitmind.config import DEFAULT_HOME
from bitmind.image_codec import encode_image
from bitmind.protocol import VideoSynapse
from bitmind.transport import Response
from bitmind.video_codec import encode_clip
from validator.augment import DEFAULT_LEVEL_PROBS, Augmenter, parse_level_probs
from validator.challenge_stats import ChallengeStats, StepTally, tally_step
from validator.challenges import (
    DEFAULT_REAL_DATASETS,
    Challenge,
    ChallengeSampler,
    RealImageSource,
    SyntheticImageSource,
    PACKAGED,
    parse_dataset_list,
)
from validator.challenges.mix import REAL, SEMI_SHARE_OF_FAKES, SEMI_SYNTHETIC, SYNTHETIC, parse_challenge_probs
from validator.mask_score import MaskScore, score_mask
from validator.miner_selection import DEFAULT_VPERMIT_STAKE_LIMIT, select_miners
from validator.reward import AnswerKind, Reward
from validator.scoring import Scorer
from validator.video.challenge import VideoChallenge
from validator.video.config import VideoChallenges

__all__ = [
    "ChallengeRunner",
    "ForwardParams",
    "QueryFn",
    "StepResult",
    "StepTimings",
    "TimedAugmenter",
    "add_forward_args",
    "build_sampler",
    "check_forward_config",
    "format_step",
]

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_SIZE = 50
DEFAULT_TIMEOUT = 9.0
DEFAULT_FAKE_PROB = 0.5
DEFAULT_JPEG_QUALITY = 75  # PIL's default, what the reference validators sent
CHALLENGE_SIZE = 256

# (axons, one base64 image for all, timeout[, VideoSynapse for a clip]) -> one Response per axon, in order.
# `ValidatorClient.query_sync`.
QueryFn = Callable[[list[bt.AxonInfo], str, float], list[Response]]


def add_forward_args(parser: argparse.ArgumentParser) -> None:
    """Flags of miner selection, querying and challenge building."""
    add = parser.add_argument
    add("--neuron.sample_size", type=int, default=DEFAULT_SAMPLE_SIZE,
        help="Miners queried per step (K), drawn uniformly among the eligible ones.")
    add("--neuron.timeout", type=float, default=DEFAULT_TIMEOUT,
        help="Seconds a miner has to answer a challenge; a later answer counts as none.")
    add("--neuron.vpermit_stake_limit", type=float, default=DEFAULT_VPERMIT_STAKE_LIMIT,
        help="Neurons holding a validator permit and more stake (alpha, as in the metagraph's S) than this are "
             "validators and are not queried.")
    add("--validator.fake_prob", type=float, default=DEFAULT_FAKE_PROB,
        help=f"Probability that a challenge is AI-generated rather than real, when --challenge.probs is not given "
             f"({SEMI_SHARE_OF_FAKES:g} of those semi-synthetic when a semi-synthetic cache is set).")
    add("--challenge.probs", type=str, default="",
        help="Shares of real, synthetic (whole generated image) and semi-synthetic (real image with an inpainted "
             "region) challenges as REAL,SYNTHETIC,SEMI weights, e.g. 0.5,0.35,0.15 (normalised); replaces "
             "--validator.fake_prob. Semi-synthetic images count as generated for the reward.")
    add("--validator.real_datasets", type=str, default=",".join(DEFAULT_REAL_DATASETS),
        help=f"Real images: comma list of hub ids / local parquet files, globs or folders / image folders, each "
             f"optionally with ?split=S&labels=0 (see validator/challenges/dataset_spec.py); '{PACKAGED}' is the small "
             f"sample shipped with the package (offline demos).")
    add("--validator.real_cache", type=str, default=str(DEFAULT_HOME / "validator" / "real_cache"),
        help="Folder where real images are cached by the background filler.")
    add("--validator.real_cache_max_gb", type=float, default=10.0,
        help="Size cap of the real-image cache (split evenly between the datasets); oldest images go first.")
    add("--validator.prefill_images", type=int, default=32,
        help="Before the first step, fill the real-image cache up to this many images (at most 60 s), so early "
        "real challenges are not drawn from a handful of images.")
    add("--validator.synthetic_cache", type=str, default=str(DEFAULT_HOME / "validator" / "synthetic_cache"),
        help="Folder of the synthetic-image cache the generator writes (read only here); empty: real challenges only.")
    add("--validator.semi_synthetic_cache", type=str,
        default=str(DEFAULT_HOME / "validator" / "semi_synthetic_cache"),
        help="Folder of the semi-synthetic cache (inpainted real images with their masks) the generator writes; "
             "empty: no semi-synthetic challenges (their share goes to synthetic ones).")
    add("--validator.augment_probs", type=str,
        default=",".join(f"{level}:{weight:g}" for level, weight in DEFAULT_LEVEL_PROBS.items()),
        help="Weights of the augmentation levels 0-3 as LEVEL:WEIGHT pairs (see validator/augment.py).")
    add("--validator.jpeg_quality", type=int, default=DEFAULT_JPEG_QUALITY,
        help="JPEG quality of the 256x256 challenge image sent to miners (1-100).")
    add("--validator.seed", type=int, default=-1,
        help="Seed of miner selection, real/fake choice and augmentation (-1: a fresh random seed).")


def check_forward_config(config: Any) -> list[str]:
    """Why these flags cannot work (one message per problem); empty when they can."""
    neuron, validator = config.neuron, config.validator
    problems = []
    if neuron.sample_size < 1:
        problems.append(f"--neuron.sample_size must be >= 1, got {neuron.sample_size}")
    if not (math.isfinite(neuron.timeout) and neuron.timeout > 0):
        problems.append(f"--neuron.timeout must be a positive number of seconds, got {neuron.timeout}")
    if math.isnan(neuron.vpermit_stake_limit) or neuron.vpermit_stake_limit < 0:
        problems.append(f"--neuron.vpermit_stake_limit must be >= 0, got {neuron.vpermit_stake_limit}")
    if not 0.0 <= validator.fake_prob <= 1.0:
        problems.append(f"--validator.fake_prob must be in [0, 1], got {validator.fake_prob}")
    if config.challenge.probs:
        try:
            parse_challenge_probs(config.challenge.probs)
        except ValueError as error:
            problems.append(f"--challenge.probs: {error}")
    if not 1 <= validator.jpeg_quality <= 100:
        problems.append(f"--validator.jpeg_quality must be in 1..100, got {validator.jpeg_quality}")
    if validator.prefill_images < 0:
        problems.append(f"--validator.prefill_images must be >= 0, got {validator.prefill_images}")
    if not (math.isfinite(validator.real_cache_max_gb) and validator.real_cache_max_gb > 0):
        problems.append(f"--validator.real_cache_max_gb must be positive, got {validator.real_cache_max_gb}")
    try:
        Augmenter(parse_level_probs(validator.augment_probs))
    except ValueError as error:
        problems.append(f"--validator.augment_probs: {error}")
    try:
        parse_dataset_list(validator.real_datasets)
    except ValueError as error:
        problems.append(f"--validator.real_datasets: {error}")
    return problems


class TimedAugmenter(Augmenter):
    """An `Augmenter` that adds the seconds it spends to `seconds`, so sampling and augmentation time split apart."""

    seconds: float = 0.0

    def augment_with_mask(
        self, image: Image.Image, mask: np.ndarray | None, rng: np.random.Generator, level: int | None = None
    ) -> tuple[Image.Image, np.ndarray | None, dict[str, Any]]:
        started = time.perf_counter()
        try:
            return super().augment_with_mask(image, mask, rng, level)
        finally:
            self.seconds += time.perf_counter() - started


def build_sampler(config: Any) -> tuple[ChallengeSampler, RealImageSource]:
    """The sampler the flags describe, and its real source (whose background filler the caller starts and stops)."""
    validator = config.validator
    seed = None if validator.seed < 0 else validator.seed
    real = RealImageSource(
        parse_dataset_list(validator.real_datasets),
        validator.real_cache,
        max_bytes=int(validator.real_cache_max_gb * 1e9),
        seed=seed,
    )
    synthetic = semi_synthetic = None
    if validator.synthetic_cache:
        synthetic = SyntheticImageSource(Path(validator.synthetic_cache).expanduser())
    else:
        log.warning("no --validator.synthetic_cache: every challenge will be a real image")
    if validator.semi_synthetic_cache:
        semi_synthetic = SyntheticImageSource(Path(validator.semi_synthetic_cache).expanduser(), kind=SEMI_SYNTHETIC)
    augmenter = TimedAugmenter(parse_level_probs(validator.augment_probs), size=CHALLENGE_SIZE)
    kind_probs = parse_challenge_probs(config.challenge.probs) if config.challenge.probs else None
    sampler = ChallengeSampler(
        real, synthetic, augmenter, fake_probability=validator.fake_prob, semi_synthetic=semi_synthetic,
        kind_probs=kind_probs,
    )
    return sampler, real


@dataclass(frozen=True)
class ForwardParams:
    """How a step queries: miners per step, answer timeout, validator stake limit, JPEG quality."""

    sample_size: int = DEFAULT_SAMPLE_SIZE
    timeout: float = DEFAULT_TIMEOUT
    vpermit_stake_limit: float = DEFAULT_VPERMIT_STAKE_LIMIT
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    @classmethod
    def from_config(cls, config: Any) -> "ForwardParams":
        return cls(
            sample_size=int(config.neuron.sample_size),
            timeout=float(config.neuron.timeout),
            vpermit_stake_limit=float(config.neuron.vpermit_stake_limit),
            jpeg_quality=int(config.validator.jpeg_quality),
        )


@dataclass
class StepTimings:
    """Seconds per phase of one step; `persistence` is filled in by the caller that saves the state."""

    sampling: float = 0.0
    augmentation: float = 0.0
    encoding: float = 0.0
    querying: float = 0.0
    scoring: float = 0.0
    persistence: float = 0.0

    @property
    def total(self) -> float:
        return self.sampling + self.augmentation + self.encoding + self.querying + self.scoring + self.persistence

    @property
    def overhead(self) -> float:
        """Everything outside the query window (the miners' answer time lies inside it)."""
        return self.total - self.querying

    def as_dict(self) -> dict[str, float]:
        return {
            "sampling": self.sampling,
            "augmentation": self.augmentation,
            "encoding": self.encoding,
            "querying": self.querying,
            "scoring": self.scoring,
            "persistence": self.persistence,
        }


@dataclass
class StepResult:
    """What one step did; `challenge` is None when no miner was eligible (nothing was drawn or sent)."""

    block: int
    challenge: Challenge | VideoChallenge | None
    uids: list[int] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    rewards: list[Reward] = field(default_factory=list)
    timings: StepTimings = field(default_factory=StepTimings)
    mask_scores: list[MaskScore | None] = field(default_factory=list)  # per miner; None: no usable mask
    tally: StepTally = field(default_factory=StepTally)

    @property
    def kind(self) -> str:
        if self.challenge is None:
            return "none"
        return "fake" if self.challenge.label == 1 else "real"

    @property
    def modality(self) -> str:
        """`video` for a clip challenge, `image` otherwise."""
        return "video" if isinstance(self.challenge, VideoChallenge) else "image"

    @property
    def source(self) -> str:
        """The dataset of a real image; `synthetic` for the generator's images."""
        if self.challenge is None:
            return "-"
        metadata = self.challenge.metadata
        source = metadata.get("source")
        return source if isinstance(source, str) and source else str(metadata.get("source_type", "?"))

    @property
    def model(self) -> str:
        """The diffusion model of a fake image, `-` for a real one."""
        return str(self.challenge.metadata.get("model") or "-") if self.challenge is not None else "-"

    @property
    def answered(self) -> int:
        """Valid answers (status 200 and a probability in [0, 1])."""
        return sum(reward.kind is AnswerKind.VALID for reward in self.rewards)

    @property
    def mean_latency(self) -> float | None:
        """Mean seconds of the miners that answered (status 200), None when none did."""
        latencies = [response.latency for response in self.responses if response.ok]
        return sum(latencies) / len(latencies) if latencies else None


class ChallengeRunner:
    """Runs the miner-facing part of a step: select, sample, augment, encode, query, score."""

    def __init__(
        self,
        sampler: ChallengeSampler,
        scorer: Scorer,
        query: QueryFn,
        own_hotkey: str,
        params: ForwardParams = ForwardParams(),
        rng: np.random.Generator | None = None,
        video: VideoChallenges | None = None,
    ) -> None:
        self.sampler = sampler
        self.video = video
        self.video_stats = ChallengeStats()  # the clip challenges' rolling figures, apart from the images
        self.scorer = scorer
        self.query = query
        self.own_hotkey = own_hotkey
        self.params = params
        self.rng = rng if rng is not None else np.random.default_rng()
        self.stats = ChallengeStats()

    def _augmentation_seconds(self) -> float:
        """Seconds the image and clip augmenters have spent so far (each counts its own)."""
        augmenters = [self.sampler.augmenter, *([self.video.sampler.augmenter] if self.video is not None else [])]
        return sum(getattr(augmenter, "seconds", 0.0) for augmenter in augmenters)

    def run(self, view: MetagraphView) -> StepResult | None:
        """One challenge against the miners of `view` (which the scorer must have synced); None if no image yet."""
        timings = StepTimings()
        uids = select_miners(view, self.params.sample_size, self.rng, self.own_hotkey, self.params.vpermit_stake_limit)
        if not uids:
            return StepResult(view.block, None, timings=timings)

        augmented_before = self._augmentation_seconds()
        started = time.perf_counter()
        challenge = None
        if self.video is not None and self.rng.random() < self.video.share:
            challenge = self.video.sampler.sample(self.rng)  # None while no clip is cached: an image instead
        if challenge is None:
            challenge = self.sampler.sample(self.rng)
        drawn = time.perf_counter()
        timings.augmentation = self._augmentation_seconds() - augmented_before
        timings.sampling = drawn - started - timings.augmentation
        if challenge is None:
            return None

        if isinstance(challenge, VideoChallenge):
            payload, synapse = encode_clip(challenge.frames, quality=self.video.quality), (VideoSynapse,)
        else:
            payload, synapse = encode_image(challenge.image, size=CHALLENGE_SIZE, quality=self.params.jpeg_quality), ()
        encoded = time.perf_counter()
        timings.encoding = encoded - drawn

        index = {uid: position for position, uid in enumerate(view.uids)}
        axons = [view.axons[index[uid]] for uid in uids]
        responses = self.query(axons, payload, self.params.timeout, *synapse)
        if len(responses) != len(uids):
            raise RuntimeError(f"the transport returned {len(responses)} responses for {len(uids)} miners")
        answered = time.perf_counter()
        timings.querying = answered - encoded

        predictions = [response.prediction for response in responses]
        statuses = [response.status for response in responses]
        modality = "video" if isinstance(challenge, VideoChallenge) else "image"
        rewards = self.scorer.score_challenge(challenge.label, uids, predictions, statuses, modality=modality)
        # Masks are scored apart and never touch the reward; a bad one is "no mask".
        truth = challenge.mask
        mask_scores = [
            score_mask(response.mask, truth) if truth is not None and response.ok else None for response in responses
        ]
        tally = tally_step(challenge.label, predictions, statuses, mask_scores)
        (self.video_stats if modality == "video" else self.stats).record(challenge.kind, tally)
        timings.scoring = time.perf_counter() - answered
        return StepResult(view.block, challenge, uids, list(responses), rewards, timings, mask_scores, tally)


def format_step(
    step: int,
    result: StepResult,
    top: Sequence[tuple[int, float]],
    stats: ChallengeStats | None = None,
    video_stats: ChallengeStats | None = None,
) -> str:
    """The one log line of a step: modality and challenge, miners queried / answered, latency, this challenge's
    accuracy and masks, top scores, phase times, and (with `stats`) the rolling accuracy and mask IoU per challenge
    kind, (with `video_stats`) the clips' rolling accuracy per kind."""
    if result.challenge is None:
        return f"step {step} block {result.block}: no eligible miner to query"
    statuses: dict[int, int] = {}
    for response in result.responses:
        if not response.ok:
            statuses[response.status] = statuses.get(response.status, 0) + 1
    invalid = sum(reward.kind is AnswerKind.INVALID for reward in result.rewards)
    failures = " ".join(f"{status}x{count}" for status, count in sorted(statuses.items())) or "none"
    latency = f"{result.mean_latency:.3f}s" if result.mean_latency is not None else "-"
    level = result.challenge.metadata.get("augmentation", {}).get("level", "?")
    times = " ".join(f"{name}={seconds * 1000:.0f}" for name, seconds in result.timings.as_dict().items())
    leaders = " ".join(f"{uid}:{score:.3f}" for uid, score in top) or "-"
    tally = result.tally
    accuracy = f"{tally.accuracy:.3f}" if tally.accuracy is not None else "-"
    masks = f"masks {tally.masks}" + (f" iou {tally.iou_sum / tally.masks:.3f}" if tally.masks else "")
    rolling = f" | {stats.format()}" if stats is not None else ""
    if video_stats is not None:
        summary = video_stats.summary()
        rolling += " | video acc " + " ".join(
            f"{kind}={'-' if figures['accuracy'] is None else format(figures['accuracy'], '.3f')}"
            for kind, figures in summary.items() if kind in (REAL, SYNTHETIC)
        )
    return (
        f"step {step} block {result.block}: {result.modality} {result.kind} ({result.challenge.kind}) "
        f"source={result.source} "
        f"model={result.model} aug={level} | queried {len(result.uids)} answered {result.answered} invalid {invalid} "
        f"failed {failures} mean_latency {latency} accuracy {accuracy} {masks} | top {leaders} | ms {times}{rolling}"
    )
