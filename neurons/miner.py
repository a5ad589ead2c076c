"""Miner process: serve a detector behind an Axon and answer validators' image challenges.

Wiring only: the detector comes from `base_miner`, batching from `base_miner.batcher`, the caller policy,
chain and transport from `bitmind`.
"""

import argparse
import asyncio
import logging
import os
import signal
import threading
import time

import bittensor as bt
import torch
from PIL import Image

from base_miner.batcher import MicroBatcher, QueueFull
from base_miner.registry import build_detector
from bitmind.caller_policy import CallerPolicy
from bitmind.chain import Chain, make_chain
from bitmind.config import add_chain_args, add_neuron_args, build_config, new_parser, setup_logging
from bitmind.image_codec import DecodeLimits
from bitmind.monitoring import Monitor, add_monitoring_args
from bitmind.protocol import ImageSynapse
from bitmind.transport import DEFAULT_MAX_REQUEST_BYTES, MinerServer, lookup_external_ip

log = logging.getLogger("bitmind.miner")

DEFAULT_PORT = 8091


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Subnet-34 miner: answers image challenges with P(AI-generated).", axon=True)
    parser.set_defaults(**{"axon.port": DEFAULT_PORT})
    add_chain_args(parser)
    add_neuron_args(parser, "miner")
    add_monitoring_args(parser)
    parser.add_argument(
        "--neuron.detector",
        type=str,
        default="camo",
        help="Detector config: a YAML path or a packaged config name (camo, npr, generalist, ucf, baseline).",
    )
    parser.add_argument(
        "--miner.batch_size",
        type=int,
        default=0,
        help="Most images per forward pass; 0 picks by device (8 on CPU: 77 served images/s on 2 cores, against 63 at "
        "1 and 62 at 16; 16 on GPU).",
    )
    parser.add_argument(
        "--miner.workers",
        type=int,
        default=0,
        help="Batches predicted at once, each on its own thread; 0 picks: one per CPU core on CPU (measured 65 vs "
        "39 served images/s with one on 2 cores), 1 on GPU.",
    )
    parser.add_argument(
        "--miner.torch_threads",
        type=int,
        default=0,
        help="Torch CPU threads for the detector; 0 picks: on CPU, all cores but one (the event loop, decoding and "
        "signature checks need it) shared among the workers, at least 1; torch's default on GPU.",
    )
    parser.add_argument(
        "--miner.batch_wait_ms",
        type=float,
        default=2.0,
        help="How long the first request of a batch waits for others to join it.",
    )
    parser.add_argument(
        "--miner.max_queue", type=int, default=256, help="Requests waiting beyond this are refused at once."
    )
    parser.add_argument(
        "--miner.max_age",
        type=float,
        default=8.0,
        help="Seconds after which a queued request is dropped unanswered (validators time out at 9 s).",
    )
    parser.add_argument(
        "--miner.max_image_mb", type=float, default=10.0, help="Largest decoded image file accepted, in MB."
    )
    parser.add_argument(
        "--miner.max_image_pixels", type=int, default=4096 * 4096, help="Largest image accepted, in pixels."
    )
    parser.add_argument(
        "--blacklist.force_validator_permit",
        action="store_true",
        help="Refuse callers without a validator permit.",
    )
    parser.add_argument(
        "--blacklist.allow_non_registered",
        action="store_true",
        help="Answer hotkeys that are not registered on the subnet (testing only).",
    )
    parser.add_argument(
        "--blacklist.min_stake", type=float, default=0.0, help="Refuse callers with less stake than this."
    )
    return parser


def usable_cores() -> int:
    """CPU cores this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_layout(workers: int, threads: int, device: str, cores: int) -> tuple[int, int]:
    """(workers, torch threads) for `--miner.workers` / `--miner.torch_threads`; 0 threads leaves torch's default.

    On 2 CPU cores, two workers with one torch thread each served 65 images/s, one worker with one thread 39, one
    worker with two threads 25: a parallel region stalls whenever request handling takes one of its cores, while
    independent single-threaded batches do not wait for each other. A GPU wants one worker and big batches.
    """
    if workers < 0 or threads < 0:
        raise SystemExit(f"--miner.workers and --miner.torch_threads must be >= 0, got {workers} and {threads}")
    if device.startswith("cuda"):
        return workers or 1, threads
    workers = workers or cores
    return workers, threads or max(1, (cores - 1) // workers)


class Miner:
    """Owns the detector, batcher, caller policy and axon; `run()` serves until `stop()`."""

    def __init__(self, config: bt.Config, chain: Chain | None = None) -> None:
        self.config = config
        self.wallet = bt.Wallet(config=config)
        self.hotkey = self.wallet.hotkey.ss58_address
        self.chain = chain or make_chain(config)
        self.stop_event = threading.Event()
        self.monitor = Monitor.from_config(config, role="miner")
        self.policy = CallerPolicy(
            force_validator_permit=bool(config.blacklist.force_validator_permit),
            min_stake=float(config.blacklist.min_stake),
            allow_non_registered=bool(config.blacklist.allow_non_registered),
        )
        self.view = self._sync()
        self.uid = self.view.uid_of(self.hotkey)
        if self.uid is None:
            raise SystemExit(
                f"hotkey {self.hotkey} is not registered on netuid {config.netuid}: "
                f"run `btcli subnet register --netuid {config.netuid} --wallet.name {config.wallet.name} "
                f"--wallet.hotkey {config.wallet.hotkey}` first"
            )
        self.detector = build_detector(config.neuron.detector, device=config.neuron.device)
        workers, threads = worker_layout(
            int(config.miner.workers), int(config.miner.torch_threads), self.detector.device, usable_cores()
        )
        if threads:
            torch.set_num_threads(threads)
        self._warm_up()
        batch_size = config.miner.batch_size or (16 if self.detector.device.startswith("cuda") else 8)
        self.batcher = MicroBatcher(
            self.detector.predict_detailed,
            batch_size=batch_size,
            max_wait_ms=config.miner.batch_wait_ms,
            max_queue=config.miner.max_queue,
            max_age_s=config.miner.max_age,
            limits=DecodeLimits(
                max_bytes=int(config.miner.max_image_mb * 1024 * 1024),
                max_pixels=int(config.miner.max_image_pixels),
            ),
            workers=workers,
        )
        external_ip = config.axon.external_ip or lookup_external_ip()
        self.server = MinerServer(
            self.wallet,
            port=config.axon.port,
            forward=self.forward,
            blacklist=self.policy.blacklist,
            ip=config.axon.ip,
            external_ip=external_ip,
            external_port=config.axon.external_port or None,
            max_request_bytes=max(DEFAULT_MAX_REQUEST_BYTES, int(config.miner.max_image_mb * 1.4 * 1024 * 1024)),
        )
        self.served = 0
        log.info(
            "miner uid=%d hotkey=%s detector=%s device=%s batch_size=%d workers=%d torch_threads=%d port=%d",
            self.uid, self.hotkey[:8], self.detector.name, self.detector.device, batch_size, workers,
            torch.get_num_threads(), config.axon.port,
        )

    def _sync(self):
        view = self.chain.sync()
        self.policy.update(view)
        self.monitor.metrics.record_sync()
        return view

    def _warm_up(self) -> None:
        """One prediction at start-up: proves the model runs and keeps first-request latency low."""
        started = time.perf_counter()
        self.detector.predict([Image.new("RGB", (256, 256), (127, 127, 127))])
        log.info("detector warm-up %.0f ms", (time.perf_counter() - started) * 1000)

    async def forward(self, synapse: ImageSynapse) -> ImageSynapse:
        started = time.perf_counter()
        caller = synapse.dendrite.hotkey if synapse.dendrite else None
        neuron = self.policy.lookup(caller)
        uid = neuron[0] if neuron else -1
        try:
            result = await self.batcher.submit(synapse.image, priority=self.policy.priority(caller))
        except QueueFull as exc:
            log.warning("request uid=%d hotkey=%s shed: %s", uid, (caller or "")[:8], exc)
            self.monitor.metrics.record_request("shed", time.perf_counter() - started)
            return synapse
        latency = time.perf_counter() - started
        if result.prediction is None:
            log.warning("request uid=%d hotkey=%s no answer: %s", uid, (caller or "")[:8], result.error)
            self.monitor.metrics.record_request("rejected", latency)
            return synapse
        synapse.prediction = float(result.prediction.probability)
        self.served += 1
        self.monitor.metrics.record_request("ok", latency)
        log.info(
            "request uid=%d hotkey=%s route=%s p=%.4f latency_ms=%.1f queue_ms=%.1f batch=%d",
            uid, (caller or "")[:8], result.prediction.route, synapse.prediction, latency * 1000,
            result.queue_ms, result.batch_size,
        )
        return synapse

    def run(self) -> None:
        self.server.start()
        info = self.server.info()
        self.chain.serve_axon(self.wallet, info.ip, info.port)
        log.info("serving axon on %s:%d (advertised %s:%d)", self.config.axon.ip, self.config.axon.port, info.ip, info.port)
        next_sync = time.monotonic() + self.config.neuron.sync_interval
        try:
            while not self.stop_event.wait(timeout=min(5.0, self.config.neuron.sync_interval)):
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self.config.neuron.sync_interval
                    try:
                        self.view = self._sync()
                        if self.view.uid_of(self.hotkey) is None:
                            log.error("hotkey %s is no longer registered; stopping", self.hotkey[:8])
                            break
                        log.info("sync block=%d neurons=%d served=%d", self.view.block, self.view.n, self.served)
                    except Exception as exc:  # noqa: BLE001 - a flaky chain must not stop serving
                        log.warning("metagraph sync failed: %s", exc)
                        self.monitor.metrics.record_error("sync")
                self.monitor.beat(served=self.served, block=self.view.block, uid=self.uid)
        finally:
            self.close()

    def stop(self, *_: object) -> None:
        self.stop_event.set()

    def close(self) -> None:
        log.info("miner shutting down after %d answers", self.served)
        self.server.stop()
        try:
            asyncio.run(self.batcher.close())
        except RuntimeError:
            pass
        self.monitor.close()
        self.chain.close()


def main(argv: list[str] | None = None) -> int:
    config = build_config(build_parser(), argv)
    setup_logging(config)
    miner = Miner(config)
    signal.signal(signal.SIGINT, miner.stop)
    signal.signal(signal.SIGTERM, miner.stop)
    miner.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
