"""Shared pieces of the validator tests: trivial miners on 127.0.0.1, image sources whose label shows in the pixels,
and a LocalChain subnet with a validator, miners, a high-stake validator and a registered neuron that serves nothing.

The side channel that lets an honest test miner answer correctly: real test images are bright and fake ones dark,
which every augmentation level keeps, so the honest miner answers by mean brightness.
"""

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bittensor as bt
import numpy as np
import pytest
from PIL import Image

from bitmind.chain.local import LocalChain
from bitmind.image_codec import decode_image
from bitmind.protocol import ImageSynapse
from bitmind.transport import MinerServer
from validator.challenges.cache import ImageCache
from tests._wallets import LOOPBACK, free_port, make_wallet

TEST_TIMEOUT = 1.0  # the validator's --neuron.timeout in these tests
HIGH_STAKE = 10_000.0  # above the default vpermit stake limit of 4096
VALIDATOR_STAKE = 100.0  # enough for a validator permit on the LocalChain
FAKE_MODEL = "tiny-test-diffuser"


def bright_image(rng: np.random.Generator, size: int = 96) -> Image.Image:
    return Image.fromarray(rng.integers(190, 256, (size, size + 16, 3), dtype=np.uint8))


def dark_image(rng: np.random.Generator, size: int = 96) -> Image.Image:
    return Image.fromarray(rng.integers(0, 60, (size + 16, size, 3), dtype=np.uint8))


class BrightSource:
    """A real-image source of bright noise; `fail_times` first calls raise (a source that breaks mid-run)."""

    def __init__(self, fail_times: int = 0) -> None:
        self.fail_times = fail_times
        self.calls = 0

    def __len__(self) -> int:
        return 1  # draws new noise each time: never empty

    def sample(self, rng: np.random.Generator) -> tuple[Image.Image, int, dict[str, Any]]:
        self.calls += 1
        if self.calls <= self.fail_times:
            raise OSError("test source: disk went away")
        return bright_image(rng), 0, {"source_type": "real", "source": "test-bright"}


class EmptySource:
    """A real-image source that has nothing cached (yet)."""

    def __len__(self) -> int:
        return 0

    def sample(self, rng: np.random.Generator) -> None:
        return None


def fill_synthetic_cache(folder: Path, count: int = 4, seed: int = 0) -> ImageCache:
    """A generator-style cache of dark images with generator metadata."""
    cache = ImageCache(folder)
    rng = np.random.default_rng(seed)
    for index in range(count):
        cache.put(dark_image(rng), {"model": FAKE_MODEL, "prompt": f"test prompt {index}", "seed": index})
    return cache


# --- miner forwards -------------------------------------------------------------------------------------------
Forward = Callable[[ImageSynapse], Awaitable[ImageSynapse]]


async def honest(synapse: ImageSynapse) -> ImageSynapse:
    """Answers the truth: dark images are the fakes."""
    pixels = np.asarray(decode_image(synapse.image), dtype=np.float32)
    synapse.prediction = 1.0 if pixels.mean() < 128 else 0.0
    return synapse


def constant(value: float) -> Forward:
    async def forward(synapse: ImageSynapse) -> ImageSynapse:
        synapse.prediction = value
        return synapse

    return forward


class Hostile:
    """Cycles through bad answers: NaN, out of range, an exception, an answer after the validator's timeout."""

    BEHAVIOURS = ("nan", "over", "raise", "sleep")

    def __init__(self) -> None:
        self._cycle = itertools.cycle(self.BEHAVIOURS)
        self.seen: list[str] = []

    async def __call__(self, synapse: ImageSynapse) -> ImageSynapse:
        behaviour = next(self._cycle)
        self.seen.append(behaviour)
        if behaviour == "raise":
            raise RuntimeError("hostile miner exploded")
        if behaviour == "sleep":
            await asyncio.sleep(TEST_TIMEOUT + 0.5)
            synapse.prediction = 0.0
        else:
            synapse.prediction = math.nan if behaviour == "nan" else 1.2
        return synapse


@dataclass
class Fleet:
    """Running miner servers by name, each with its own wallet."""

    servers: dict[str, MinerServer] = field(default_factory=dict)
    hostile: Hostile | None = None

    def hotkey(self, name: str) -> str:
        return self.servers[name].hotkey

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three running miners: `honest`, `constant` (always 0.3) and `hostile` (`fleet.hostile` records what it did)."""
    import bittensor.utils.networking as networking

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(networking, "get_external_ip", lambda: LOOPBACK)
        hostile = Hostile()
        running = start_fleet(
            tmp_path_factory.mktemp("fleet"), {"honest": honest, "constant": constant(0.3), "hostile": hostile}
        )
    running.hostile = hostile
    try:
        yield running
    finally:
        running.stop()


def start_fleet(wallet_root: Path, forwards: dict[str, Forward]) -> Fleet:
    fleet = Fleet()
    try:
        for name, forward in forwards.items():
            wallet = make_wallet(wallet_root, name)
            fleet.servers[name] = MinerServer(wallet, free_port(), forward, external_ip=LOOPBACK).start()
    except BaseException:
        fleet.stop()
        raise
    return fleet


@dataclass
class Subnet:
    """A LocalChain with: the validator (uid 0), the fleet's miners serving, a high-stake validator serving an axon,
    and a registered neuron that serves nothing."""

    chain: LocalChain
    chain_path: Path
    wallet_root: Path
    validator: bt.Wallet
    uids: dict[str, int]

    def close(self) -> None:
        self.chain.close()


def build_subnet(root: Path, fleet: Fleet, seconds_per_block: float = 0.05, validator_serves: bool = True) -> Subnet:
    chain_path = root / "chain.sqlite"
    chain = LocalChain(chain_path, seconds_per_block=seconds_per_block)
    wallet_root = root / "wallets"
    validator = make_wallet(wallet_root, "validator")
    uids = {"validator": chain.register_hotkey(validator.hotkey.ss58_address, validator.coldkeypub.ss58_address,
                                               stake=VALIDATOR_STAKE)}
    if validator_serves:  # an axon of its own must not make the validator query itself
        chain.serve_axon(validator, LOOPBACK, free_port())
    for name, server in fleet.servers.items():
        wallet = server.axon.wallet
        uids[name] = chain.register_hotkey(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
        chain.serve_axon(wallet, LOOPBACK, server.port)
    whale = make_wallet(wallet_root, "whale-validator")
    uids["whale"] = chain.register_hotkey(whale.hotkey.ss58_address, whale.coldkeypub.ss58_address, stake=HIGH_STAKE)
    chain.serve_axon(whale, LOOPBACK, free_port())
    silent = make_wallet(wallet_root, "silent")
    uids["silent"] = chain.register_hotkey(silent.hotkey.ss58_address, silent.coldkeypub.ss58_address)
    return Subnet(chain, chain_path, wallet_root, validator, uids)


def validator_argv(subnet: Subnet, root: Path, *extra: str) -> list[str]:
    """Flags of a validator on `subnet` that needs no network: packaged real sample, a tmp synthetic cache."""
    return [
        "--chain", "local", "--chain.path", str(subnet.chain_path),
        "--wallet.path", str(subnet.wallet_root), "--wallet.name", "validator", "--wallet.hotkey", "default",
        "--neuron.state_dir", str(root / "state"),
        "--neuron.watchdog_timeout", "0",
        "--neuron.sync_interval", "0",
        "--neuron.step_interval", "0",
        "--neuron.timeout", str(TEST_TIMEOUT),
        "--validator.external_ip", LOOPBACK,
        "--validator.real_datasets", "packaged",
        "--validator.real_cache", str(root / "real_cache"),
        "--validator.synthetic_cache", str(root / "synthetic_cache"),
        "--validator.semi_synthetic_cache", str(root / "semi_synthetic_cache"),
        "--validator.seed", "7",
        "--validator.video_share", "0",  # image challenges only unless a test asks for clips
        *extra,
    ]
