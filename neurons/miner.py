"""Miner process: serve a detector behind an Axon and answer validators' image and video challenges.

Wiring only: the detector comes from `base_miner`, batching from `base_miner.batcher`, the caller policy,
chain and transport from `bitmind`.
"""

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence

import bittensor as bt
import numpy as np
import torch
from PIL import Image

from base_miner.batcher import BatchResult, MicroBatcher, QueueFull
from base_miner.registry import build_detector
from bitmind.caller_policy import CallerPolicy
from bitmind.chain import Chain, ChainError, make_chain
from bitmind.config import add_chain_args, add_neuron_args, build_config, new_parser, setup_logging
from bitmind.image_codec import DecodeLimits
from bitmind.mask_codec import encode_mask
from bitmind.monitoring.monitor import Monitor, add_monitoring_args
from bitmind.protocol import ImageSynapse, VideoSynapse
from bitmind.transport import (
    DEFAULT_MAX_REQUEST_BYTES,
    Blacklist,
    Forward,
    MinerServer,
    ServeError,
    VideoForward,
    lookup_external_ip,
)
from bitmind.video_codec import VideoLimits, decode_clip

log = logging.getLogger("bitmind.miner")

DEFAULT_PORT = 8091
LOOPBACK = "127.0.0.1"
# Seconds between tries of publishing the axon address when the chain fails (timeout, dropped connection); after the
# last one the miner exits with the chain's reason instead of serving an address nobody can find.
SERVE_AXON_RETRY_DELAYS = (2.0, 4.0, 8.0, 16.0)


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
        "--neuron.video_detector",
        type=str,
        default="tall",
        help="Video detector config (a YAML path or packaged name such as tall), served on the same axon with the "
        "same batching and limits; 'none' answers every video challenge with -1 (no answer).",
    )
    parser.add_argument(
        "--miner.max_video_mb", type=float, default=8.0, help="Largest decoded clip payload accepted, in MB."
    )
    parser.add_argument(
        "--miner.batch_size",
        type=int,
        default=0,
        help="Most images per forward pass; 0 picks by device: 8 on CPU, 16 on GPU (measurements: README, "
        "Benchmarks).",
    )
    parser.add_argument(
        "--miner.workers",
        type=int,
        default=0,
        help="Batches predicted at once, each on its own thread; 0 picks: one per CPU core on CPU (independent "
        "single-threaded batches do not wait for each other), 1 on GPU.",
    )
    parser.add_argument(
        "--miner.torch_threads",
        type=int,
        default=0,
        help="Torch CPU threads for the detector (ONNX Runtime, which serves frozen trunks on CPU, uses the same "
        "count); 0 picks: on CPU, all cores but one (the event loop, decoding and signature checks need it) shared "
        "among the workers, at least 1; torch's default on GPU.",
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
        "--miner.index",
        type=str,
        default="",
        help="Retrieval index folder (bitmind-index build): CAMO answers challenges it recognises as indexed public "
        "real images from the index, the rest from its experts; empty: no look-up.",
    )
    parser.add_argument(
        "--miner.masks",
        action="store_true",
        help="Also answer image challenges with the detector's generated-pixel map in the optional mask field "
        "(needs a detector that produces maps: segmenter, or CAMO with a segmenter expert); it is scored apart "
        "from the binary reward.",
    )
    parser.add_argument(
        "--blacklist.force_validator_permit",
        action="store_true",
        help="Refuse callers without a validator permit.",
    )
    parser.add_argument(
        "--blacklist.allow_non_registered",
        action="store_true",
        help="Answer hotkeys that are not registered on the subnet (testing only; refused together with "
        "--blacklist.force_validator_permit or --blacklist.min_stake).",
    )
    parser.add_argument(
        "--blacklist.min_stake", type=float, default=0.0,
        help="Refuse callers with less stake than this, in the subnet's alpha units (metagraph.S), not TAO.",
    )
    return parser


def advertised_ip(config: bt.Config) -> str:
    """The IP published on chain: `--axon.external_ip`, else bittensor's internet lookup.

    When the lookup fails, a local chain (demo) takes 127.0.0.1; the real chain would refuse it, so there it is a
    SystemExit naming the setting to fill in, before the detector loads, instead of a crash loop after it. (Whether
    the chain accepts a given address is the chain's call: `Chain.serve_axon`.)
    """
    ip = config.axon.external_ip or lookup_external_ip()
    if ip is None and config.chain.backend == "local":
        return LOOPBACK
    fix = (
        "set AXON_EXTERNAL_IP in miner.env (--axon.external_ip) to the public IP validators reach this machine on, and "
        "AXON_EXTERNAL_PORT (--axon.external_port) when a NAT forwards another port to --axon.port"
    )
    if ip is None:
        raise SystemExit(f"cannot find this machine's public IP (lookup failed: offline or outbound HTTPS blocked): {fix}")
    try:
        return str(ipaddress.ip_address(ip.strip("[]")))
    except ValueError:
        raise SystemExit(f"--axon.external_ip must be an IP address, got {ip!r}: {fix}") from None


def build_server(
    config: bt.Config,
    wallet: bt.Wallet,
    forward: Forward,
    blacklist: Blacklist | None,
    external_ip: str,
    video_forward: VideoForward | None = None,
) -> MinerServer:
    """The axon as the `--axon.*` and `--miner.max_image_mb` flags describe it (not started)."""
    return MinerServer(
        wallet,
        port=config.axon.port,
        forward=forward,
        blacklist=blacklist,
        ip=config.axon.ip,
        external_ip=external_ip,
        external_port=config.axon.external_port or None,
        max_request_bytes=max(
            DEFAULT_MAX_REQUEST_BYTES,
            int(max(config.miner.max_image_mb, config.miner.max_video_mb) * 1.4 * 1024 * 1024),
        ),
        video_forward=video_forward,
    )


def usable_cores() -> int:
    """CPU cores this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_layout(workers: int, threads: int, device: str, cores: int) -> tuple[int, int]:
    """(workers, torch threads) for `--miner.workers` / `--miner.torch_threads`; 0 threads leaves torch's default.

    On CPU, one single-threaded worker per core: a parallel region stalls whenever request handling takes one of
    its cores, while independent single-threaded batches do not wait for each other (measurements: README,
    Benchmarks). A GPU wants one worker and big batches.
    """
    if workers < 0 or threads < 0:
        raise SystemExit(f"--miner.workers and --miner.torch_threads must be >= 0, got {workers} and {threads}")
    if device.startswith("cuda"):
        return workers or 1, threads
    workers = workers or cores
    return workers, threads or max(1, (cores - 1) // workers)


def retrieval_override(config: bt.Config) -> dict[str, dict[str, str]]:
    """The CAMO config key that hands `--miner.index` to the detector, after checking the index's manifest, so a
    missing, unfinished or mismatched index (or a detector that is not CAMO) stops start-up with the reason."""
    folder = config.miner.index
    if not folder:
        return {}
    from base_miner.registry import ConfigError, load_config
    from base_miner.retrieval.descriptor import Descriptor
    from base_miner.retrieval.index import read_manifest

    detector = load_config(config.neuron.detector).get("detector")
    if detector != "CAMO":
        raise SystemExit(f"--miner.index needs a CAMO detector, but --neuron.detector {config.neuron.detector!r} is {detector!r}")
    try:
        manifest = read_manifest(folder, Descriptor.identity(), verify_files=False)
    except ConfigError as exc:
        raise SystemExit(f"--miner.index: {exc}") from None
    log.info("retrieval index %s: %d images, %d entries", folder, manifest["images"], manifest["entries"])
    return {"retrieval": {"index": os.path.abspath(os.path.expanduser(folder))}}


def warm_up_images() -> list[Image.Image]:
    """A flat and a detailed 256² image: detectors that route by content (CAMO's route by effective resolution sends
    a flat image to its thumbnail expert) run every full-size path once."""
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    return [Image.new("RGB", (256, 256), (127, 127, 127)), Image.fromarray(noise)]


class Miner:
    """Owns the detector, batcher, caller policy and axon; `run()` serves until `stop()`.

    `serve_retry_delays`: seconds between tries of publishing the axon address on chain (see SERVE_AXON_RETRY_DELAYS).
    """

    def __init__(
        self,
        config: bt.Config,
        chain: Chain | None = None,
        serve_retry_delays: Sequence[float] = SERVE_AXON_RETRY_DELAYS,
    ) -> None:
        self.config = config
        self.serve_retry_delays = tuple(serve_retry_delays)
        self.external_ip = advertised_ip(config)
        self.wallet = bt.Wallet(config=config)
        self.hotkey = self.wallet.hotkey.ss58_address
        self.chain = chain or make_chain(config)
        self.stop_event = threading.Event()
        self.monitor = Monitor.from_config(config, role="miner")
        try:
            self.policy = CallerPolicy(
                force_validator_permit=bool(config.blacklist.force_validator_permit),
                min_stake=float(config.blacklist.min_stake),
                allow_non_registered=bool(config.blacklist.allow_non_registered),
            )
        except ValueError as exc:
            raise SystemExit(f"--blacklist flags: {exc}") from None
        self.view = self._sync()
        self.uid = self.view.require_uid(self.hotkey, config.wallet.name, config.wallet.hotkey)
        self.detector = build_detector(config.neuron.detector, device=config.neuron.device, **retrieval_override(config))
        self.return_masks = bool(config.miner.masks)
        if self.return_masks and not self.detector.produces_masks:
            raise SystemExit(
                f"--miner.masks needs a detector that produces generated-pixel maps; {config.neuron.detector!r} does "
                "not (use the segmenter config, or a CAMO config with a segmenter expert such as camo_segmenter)"
            )
        workers, threads = worker_layout(
            int(config.miner.workers), int(config.miner.torch_threads), self.detector.device, usable_cores()
        )
        if threads:
            torch.set_num_threads(threads)
        self.video_detector = None
        if str(config.neuron.video_detector).lower() != "none":
            self.video_detector = build_detector(config.neuron.video_detector, device=config.neuron.device)
            if not hasattr(self.video_detector, "predict_clips"):
                raise SystemExit(
                    f"--neuron.video_detector {config.neuron.video_detector!r} is an image detector; give a video "
                    "detector config (tall) or none"
                )
        self._warm_up()
        batch_size = config.miner.batch_size or (16 if self.detector.device.startswith("cuda") else 8)
        # Images and clips are batched alike, each modality in its own queue.
        batching = dict(
            batch_size=batch_size,
            max_wait_ms=config.miner.batch_wait_ms,
            max_queue=config.miner.max_queue,
            max_age_s=config.miner.max_age,
            workers=workers,
        )
        self.batcher = MicroBatcher(
            self.detector.predict_detailed,
            limits=DecodeLimits(
                max_bytes=int(config.miner.max_image_mb * 1024 * 1024),
                max_pixels=int(config.miner.max_image_pixels),
            ),
            **batching,
        )
        self.video_batcher = None
        if self.video_detector is not None:
            limits = VideoLimits(max_bytes=int(config.miner.max_video_mb * 1024 * 1024))
            self.video_batcher = MicroBatcher(
                self.video_detector.predict_clips, decode=lambda payload: decode_clip(payload, limits), **batching
            )
        self.server = build_server(
            config, self.wallet, self.forward, self.policy.blacklist, self.external_ip, self.forward_video
        )
        self.served = 0
        log.info(
            "miner uid=%d hotkey=%s detector=%s video_detector=%s device=%s batch_size=%d workers=%d torch_threads=%d "
            "port=%d",
            self.uid, self.hotkey[:8], self.detector.name, self.video_detector.name if self.video_detector else "none",
            self.detector.device, batch_size, workers,
            torch.get_num_threads(), config.axon.port,
        )

    def _sync(self):
        view = self.chain.sync()
        self.policy.update(view)
        self.monitor.metrics.record_sync()
        return view

    def _warm_up(self) -> None:
        """One prediction at start-up: proves the model runs and keeps first-request latency low (first use builds
        lazy state, e.g. the ONNX Runtime export of a frozen trunk, which can take longer than a validator waits)."""
        started = time.perf_counter()
        self.detector.warm_up(warm_up_images())
        if self.video_detector is not None:
            self.video_detector.predict_clips([np.full((16, 256, 256, 3), 127, np.uint8)])
        log.info("detector warm-up %.0f ms", (time.perf_counter() - started) * 1000)

    async def forward(self, synapse: ImageSynapse) -> ImageSynapse:
        result = await self._answer(synapse, synapse.image, self.batcher, "image")
        if self.return_masks and result is not None and result.prediction.mask is not None:
            try:
                synapse.mask = encode_mask(result.prediction.mask)
            except ValueError as exc:  # a map the codec refuses costs the mask, never the prediction
                log.warning("image request: mask not sent: %s", exc)
        return synapse

    async def forward_video(self, synapse: VideoSynapse) -> VideoSynapse:
        """Clips go to the video detector's batcher; without one (`--neuron.video_detector none`) the answer stays -1."""
        if self.video_batcher is not None:
            await self._answer(synapse, synapse.video, self.video_batcher, "video")
        return synapse

    async def _answer(self, synapse, payload: str, batcher: MicroBatcher, modality: str) -> BatchResult | None:
        """Queue one challenge by caller stake and set `synapse.prediction`; None (prediction left at -1) when it is
        shed, undecodable or the detector fails on it."""
        started = time.perf_counter()
        caller = synapse.dendrite.hotkey if synapse.dendrite else None
        neuron = self.policy.lookup(caller)
        uid = neuron[0] if neuron else -1
        try:
            result = await batcher.submit(payload, priority=self.policy.priority(caller))
        except QueueFull as exc:
            log.warning("%s request uid=%d hotkey=%s shed: %s", modality, uid, (caller or "")[:8], exc)
            self.monitor.metrics.record_request("shed", time.perf_counter() - started)
            return None
        latency = time.perf_counter() - started
        if result.prediction is None:
            log.warning("%s request uid=%d hotkey=%s no answer: %s", modality, uid, (caller or "")[:8], result.error)
            self.monitor.metrics.record_request("rejected", latency)
            return None
        synapse.prediction = float(result.prediction.probability)
        self.served += 1
        self.monitor.metrics.record_request("ok", latency)
        log.info(
            "%s request uid=%d hotkey=%s route=%s p=%.4f latency_ms=%.1f queue_ms=%.1f batch=%d",
            modality, uid, (caller or "")[:8], result.prediction.route, synapse.prediction, latency * 1000,
            result.queue_ms, result.batch_size,
        )
        return result

    def _publish(self) -> bool:
        """Put the axon's advertised address on chain, retrying while the chain fails; False when stopped meanwhile.
        SystemExit with the chain's reason after the last try."""
        info = self.server.info()
        tries = len(self.serve_retry_delays) + 1
        attempt = 1
        while True:
            try:
                self.chain.serve_axon(self.wallet, info.ip, info.port)
            except ChainError as exc:
                if attempt == tries:
                    raise SystemExit(
                        f"could not publish the axon address {info.ip}:{info.port} on chain after {tries} tries: {exc}"
                    ) from None
                delay = self.serve_retry_delays[attempt - 1]
                log.warning("serve_axon %s:%d failed (try %d/%d): %s; retrying in %.0f s",
                            info.ip, info.port, attempt, tries, exc, delay)
                if self.stop_event.wait(delay):
                    return False
                attempt += 1
            else:
                log.info("axon published: %s:%d on netuid %d", info.ip, info.port, self.config.netuid)
                return True

    def run(self) -> None:
        try:
            self.server.start()
            if not self._publish():
                return
            self._serve()
        finally:
            self.close()

    def _serve(self) -> None:
        """Keep the metagraph fresh and the heartbeat beating until `stop()` or deregistration."""
        next_sync = time.monotonic() + self.config.neuron.sync_interval
        while not self.stop_event.wait(timeout=min(5.0, self.config.neuron.sync_interval)):
            if time.monotonic() >= next_sync:
                next_sync = time.monotonic() + self.config.neuron.sync_interval
                try:
                    self.view = self._sync()
                    if self.view.uid_of(self.hotkey) is None:
                        log.error("hotkey %s is no longer registered; stopping", self.hotkey[:8])
                        return
                    log.info("sync block=%d neurons=%d served=%d", self.view.block, self.view.n, self.served)
                except Exception as exc:  # noqa: BLE001 - a flaky chain must not stop serving
                    log.warning("metagraph sync failed: %s", exc)
                    self.monitor.metrics.record_error("sync")
            self.monitor.beat(served=self.served, block=self.view.block, uid=self.uid)

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
    """Run the miner; a start-up failure the operator must fix (chain unreachable or refusing, axon address or port
    unusable) ends the process with one line saying why, not a stack trace."""
    config = build_config(build_parser(), argv)
    setup_logging(config)
    try:
        miner = Miner(config)
        signal.signal(signal.SIGINT, miner.stop)
        signal.signal(signal.SIGTERM, miner.stop)
        miner.run()
    except (ChainError, ServeError) as exc:
        raise SystemExit(f"miner cannot run: {exc}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
