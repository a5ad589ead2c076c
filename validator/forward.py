"""One validator step without the process around it: choose miners, build a challenge, query, score.

`ChallengeRunner.run(view)` picks up to `sample_size` eligible miners, draws a challenge from the `ChallengeSampler`
(real or fake, augmented), encodes it as a 256² JPEG, queries every chosen miner in parallel under one timeout and
scores the answers with the `Scorer`. It measures each phase, so the benchmark and the step log line can show where a
step's time goes. Persistence, weights, syncing and the loop belong to `neurons/validator.py`.

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
from bitmind.transport import Response
from validator.augment import DEFAULT_LEVEL_PROBS, Augmenter, parse_level_probs
from validator.challenges import (
    DEFAULT_REAL_DATASETS,
    Challenge,
    ChallengeSampler,
    RealImageSource,
    SyntheticImageSource,
    PACKAGED,
    parse_dataset_list,
)
from validator.miner_selection import DEFAULT_VPERMIT_STAKE_LIMIT, select_miners
from validator.reward import AnswerKind, Reward
from validator.scoring import Scorer

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

# (axons, one base64 image for all, timeout) -> one Response per axon, in order. `ValidatorClient.query_sync`.
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
        help="Probability that a challenge is AI-generated (from the synthetic cache) rather than real.")
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

    def __call__(
        self, image: Image.Image, rng: np.random.Generator, level: int | None = None
    ) -> tuple[Image.Image, dict[str, Any]]:
        started = time.perf_counter()
        try:
            return super().__call__(image, rng, level)
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
    synthetic = None
    if validator.synthetic_cache:
        synthetic = SyntheticImageSource(Path(validator.synthetic_cache).expanduser())
    else:
        log.warning("no --validator.synthetic_cache: every challenge will be a real image")
    augmenter = TimedAugmenter(parse_level_probs(validator.augment_probs), size=CHALLENGE_SIZE)
    return ChallengeSampler(real, synthetic, augmenter, fake_probability=validator.fake_prob), real


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
    challenge: Challenge | None
    uids: list[int] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    rewards: list[Reward] = field(default_factory=list)
    timings: StepTimings = field(default_factory=StepTimings)

    @property
    def kind(self) -> str:
        if self.challenge is None:
            return "none"
        return "fake" if self.challenge.label == 1 else "real"

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
    ) -> None:
        self.sampler = sampler
        self.scorer = scorer
        self.query = query
        self.own_hotkey = own_hotkey
        self.params = params
        self.rng = rng if rng is not None else np.random.default_rng()

    def run(self, view: MetagraphView) -> StepResult | None:
        """One challenge against the miners of `view` (which the scorer must have synced); None if no image yet."""
        timings = StepTimings()
        uids = select_miners(view, self.params.sample_size, self.rng, self.own_hotkey, self.params.vpermit_stake_limit)
        if not uids:
            return StepResult(view.block, None, timings=timings)

        augmenter = self.sampler.augmenter
        augmented_before = getattr(augmenter, "seconds", 0.0)
        started = time.perf_counter()
        challenge = self.sampler.sample(self.rng)
        drawn = time.perf_counter()
        timings.augmentation = getattr(augmenter, "seconds", 0.0) - augmented_before
        timings.sampling = drawn - started - timings.augmentation
        if challenge is None:
            return None

        image = encode_image(challenge.image, size=CHALLENGE_SIZE, quality=self.params.jpeg_quality)
        encoded = time.perf_counter()
        timings.encoding = encoded - drawn

        index = {uid: position for position, uid in enumerate(view.uids)}
        axons = [view.axons[index[uid]] for uid in uids]
        responses = self.query(axons, image, self.params.timeout)
        if len(responses) != len(uids):
            raise RuntimeError(f"the transport returned {len(responses)} responses for {len(uids)} miners")
        answered = time.perf_counter()
        timings.querying = answered - encoded

        rewards = self.scorer.score_challenge(
            challenge.label,
            uids,
            [response.prediction for response in responses],
            [response.status for response in responses],
        )
        timings.scoring = time.perf_counter() - answered
        return StepResult(view.block, challenge, uids, list(responses), rewards, timings)


def format_step(step: int, result: StepResult, top: Sequence[tuple[int, float]]) -> str:
    """The one log line of a step: challenge, miners queried / answered, latency, top scores, phase times."""
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
    return (
        f"step {step} block {result.block}: {result.kind} source={result.source} model={result.model} "
        f"aug={level} | queried {len(result.uids)} answered {result.answered} invalid {invalid} "
        f"failed {failures} mean_latency {latency} | top {leaders} | ms {times}"
    )
