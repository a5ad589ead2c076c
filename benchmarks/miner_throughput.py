"""Miner throughput on 127.0.0.1: served latency and images/s under C concurrent validator-like queries.

Prints, for one detector config:
  1. the detector's own in-process ms/image (256² images, decoded already) at batch 1, 8 and 32 on torch's default
     threads, and with the miner's CPU layout (one batch of 8 per core at once, one torch thread each); served
     images/s are compared with the best one-batch-at-a-time figure and with the best of all;
  2. our miner (`neurons.miner`, async forward + micro-batching off the event loop) under C = 1, 8, 32, 50;
  3. a stand-in with the reference subnet's habits (synchronous handler, one image at a time ON the event loop)
     measured the same way in the same run.
Both servers run as separate processes; the load generator is this process (one Dendrite, like a validator).
With `--index DIR` our miner is also served with that retrieval index (`--miner.index`), right after the run
without it, on the same images (none of them indexed: the look-up's whole cost, no answer saved). Unknown photos
(`--images photos`, the default) reach the look-up's keypoint check about twice as often as generated challenges
(`--images challenges`), whose share the index's shortlist is fitted on.

    python benchmarks/miner_throughput.py --detector camo --queries 200
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("READ_ONLY", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

LOOPBACK = "127.0.0.1"


def challenge_images(count: int, seed: int = 0) -> list[Image.Image]:
    """256² photos-like test images (scikit-image samples, randomly cropped), as validators send."""
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        array = sources[index % len(sources)]
        h, w = array.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        images.append(Image.fromarray(array[top : top + side, left : left + side]).resize((256, 256)))
    return images


def in_process(detector_config: str, images: list[Image.Image], repeats: int, workers: int) -> dict[str, float]:
    """ms per image of `predict`: one batch at a time on torch's default threads at batch 1, 8, 32; then `workers`
    batches of 8 at once, one torch thread each (the miner's CPU layout)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from base_miner.registry import build_detector

    detector = build_detector(detector_config, device="cpu")
    detector.predict(images[:2])

    def timed(batch: int, pool: ThreadPoolExecutor | None) -> float:
        work = (images * (batch * repeats // len(images) + 1))[: batch * repeats]
        chunks = [work[offset : offset + batch] for offset in range(0, len(work), batch)]
        started = time.perf_counter()
        for _ in pool.map(detector.predict, chunks) if pool else map(detector.predict, chunks):
            pass
        return (time.perf_counter() - started) * 1000 / len(work)

    threads = torch.get_num_threads()
    out = {f"batch {batch} x{threads} threads": timed(batch, None) for batch in (1, 8, 32)}
    torch.set_num_threads(1)
    with ThreadPoolExecutor(workers) as pool:
        # Warm every worker thread first, as a miner's threads are warm after their first batch: each builds its
        # own face-gate models and the one-thread ONNX Runtime session once.
        all_started = threading.Barrier(workers)
        list(pool.map(lambda _: all_started.wait() or detector.predict(images[:1]), range(workers)))
        out[f"{workers} batches of 8 at once x1 thread"] = timed(8, pool)
    torch.set_num_threads(threads)
    return out


def serve_reference(args: argparse.Namespace) -> None:
    """The reference subnet's habit: decode and predict synchronously inside the handler, one image at a time."""
    import bittensor as bt

    from base_miner.registry import build_detector
    from bitmind.image_codec import decode_image
    from bitmind.protocol import ImageSynapse
    from bitmind.transport import MinerServer

    detector = build_detector(args.detector, device="cpu")
    detector.predict(challenge_images(1))

    async def forward(synapse: ImageSynapse) -> ImageSynapse:
        synapse.prediction = detector.predict([decode_image(synapse.image)])[0]
        return synapse

    wallet = bt.Wallet(name="reference", hotkey="default", path=args.wallets)
    server = MinerServer(wallet, args.port, forward, blacklist=lambda hotkey: (False, ""), external_ip=LOOPBACK)
    server.start()
    try:
        while True:
            time.sleep(1)
    finally:
        server.stop()


async def load(client, axon, payloads: list[str], concurrency: int, timeout: float) -> tuple[list[float], float, int]:
    """Keep `concurrency` queries in flight until every payload is answered; latencies, wall seconds, failures."""
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    failures = 0

    async def one(payload: str) -> None:
        nonlocal failures
        async with semaphore:
            started = time.perf_counter()
            [response] = await client.query([axon], [payload], timeout)
            latencies.append(time.perf_counter() - started)
            if response.status != 200 or not isinstance(response.prediction, float) or response.prediction < 0:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in payloads))
    return latencies, time.perf_counter() - started, failures


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 180.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with code {process.returncode}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"server on port {port} did not answer within {timeout:.0f}s")


async def measure_server(label: str, process: subprocess.Popen, port: int, validator, hotkey: str, coldkey: str,
                         payloads: list[str], levels: list[int], timeout: float) -> list[tuple]:
    """One row per level: label, C, p50 ms, p99 ms, images/s, failures, server and load-generator CPU in cores."""
    import bittensor as bt
    import psutil

    from bitmind.transport import ValidatorClient

    wait_for_port(port, process)
    server = psutil.Process(process.pid)
    client = ValidatorClient(validator, external_ip=LOOPBACK)
    axon = bt.AxonInfo(version=0, ip=LOOPBACK, port=port, ip_type=4, hotkey=hotkey, coldkey=coldkey)
    rows = []
    for concurrency in levels:
        await load(client, axon, payloads[: max(concurrency, 8)], concurrency, timeout)  # warm-up
        server_cpu, client_cpu = sum(server.cpu_times()[:2]), time.process_time()
        latencies, wall, failures = await load(client, axon, payloads, concurrency, timeout)
        server_cpu, client_cpu = sum(server.cpu_times()[:2]) - server_cpu, time.process_time() - client_cpu
        ordered = sorted(latencies)
        rows.append((label, concurrency, statistics.median(ordered) * 1000,
                     ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
                     len(payloads) / wall, failures, server_cpu / wall, client_cpu / wall))
    await client.aclose()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="camo", help="Detector config name or YAML path.")
    parser.add_argument("--queries", type=int, default=200, help="Queries per concurrency level.")
    parser.add_argument("--concurrency", default="1,8,32,50", help="Comma-separated concurrency levels.")
    parser.add_argument("--timeout", type=float, default=9.0, help="Per-query timeout (validators use 9 s).")
    parser.add_argument("--batch-size", type=int, default=0, help="--miner.batch_size for our miner (0 = auto).")
    parser.add_argument("--workers", type=int, default=0, help="--miner.workers for our miner (0 = auto).")
    parser.add_argument("--repeats", type=int, default=24, help="Batches per size for the in-process figures.")
    parser.add_argument("--skip-reference", action="store_true", help="Do not measure the reference stand-in.")
    parser.add_argument("--index", default="", help="Also serve our miner with this retrieval index (--miner.index).")
    parser.add_argument("--images", choices=("photos", "challenges", "heldout"), default="photos",
                        help="What is served: random 256² crops of scikit-image's sample photos; validator challenges "
                             "(default augmentation mix) made from --data's generated diverse/train images, what a "
                             "miner is sent when the challenge is generated; or such challenges made from the held-out "
                             "protocol's real and generated rows (images no shipped detector was fitted on).")  # fmt: skip
    parser.add_argument("--data", default="../shared/data", help="The shared data folder (for challenges and heldout).")
    parser.add_argument("--serve-reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--wallets", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_reference:
        serve_reference(args)
        return 0

    from bitmind.chain.local import LocalChain
    from bitmind.image_codec import encode_image
    from bitmind.dev_wallets import make_wallet
    from bitmind.ports import free_port
    from neurons.miner import usable_cores

    levels = [int(c) for c in args.concurrency.split(",")]
    if args.images in ("challenges", "heldout"):
        from base_miner.arena.protocol import protocol_spec
        from retrieval import served_sample  # benchmarks/retrieval.py, beside this script

        spec = protocol_spec(f"{args.data}/diverse") if args.images == "heldout" else None
        images = served_sample(args.data, count=128 if spec else 64, spec=spec)
    else:
        images = challenge_images(64)
    payloads = [encode_image(images[i % len(images)]) for i in range(args.queries)]
    print(f"detector={args.detector} images={args.images} queries/level={args.queries} cores={usable_cores()}")
    figures = in_process(args.detector, images, args.repeats, args.workers or usable_cores())
    # The yardstick is one batch at a time (batch 1 / 8 / 32); the miner's layout on CPU is stricter.
    one_batch_best = max(1000.0 / ms for label, ms in figures.items() if "at once" not in label)
    best = max(1000.0 / ms for ms in figures.values())
    print("in-process predict: " + "  ".join(f"{label}: {ms:.1f} ms/img" for label, ms in figures.items()))

    work = Path(tempfile.mkdtemp(prefix="miner-bench-"))
    chain = LocalChain(work / "chain.sqlite")
    miner, validator, reference = (make_wallet(work / "wallets", n) for n in ("miner", "validator", "reference"))
    for wallet, stake in ((miner, 0.0), (validator, 1000.0)):
        chain.register_hotkey(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address, stake=stake)
    def serve_and_measure(label: str, wallet, argv: list[str]) -> list[tuple]:
        """Start a server process (`argv` + its port), load it at every level, stop it."""
        port = free_port()
        with open(work / f"{label}.log", "w") as log_file:
            process = subprocess.Popen(argv + [str(port)], stdout=log_file, stderr=subprocess.STDOUT)
            try:
                return asyncio.run(measure_server(label, process, port, validator, wallet.hotkey.ss58_address,
                                                  wallet.coldkeypub.ss58_address, payloads, levels, args.timeout))
            finally:
                process.terminate()
                process.wait(timeout=30)

    ours = [
        sys.executable, "-m", "neurons.miner", "--chain", "local", "--chain.path", str(work / "chain.sqlite"),
        "--wallet.path", str(work / "wallets"), "--wallet.name", "miner", "--wallet.hotkey", "default",
        "--axon.ip", LOOPBACK, "--axon.external_ip", LOOPBACK, "--neuron.detector", args.detector,
        "--neuron.device", "cpu", "--neuron.state_dir", str(work / "state"), "--miner.batch_size",
        str(args.batch_size), "--miner.workers", str(args.workers), "--neuron.watchdog_timeout", "0",
    ]  # fmt: skip
    rows = serve_and_measure("ours", miner, ours + ["--axon.port"])
    if args.index:
        rows += serve_and_measure("ours + index", miner, ours + ["--miner.index", args.index, "--axon.port"])
    if not args.skip_reference:
        rows += serve_and_measure("reference-style", reference, [
            sys.executable, __file__, "--serve-reference", "--detector", args.detector,
            "--wallets", str(work / "wallets"), "--port",
        ])
    print(f"\n| server | C | p50 ms | p99 ms | images/s | failed | server CPU | load-generator CPU "
          f"| vs one batch at a time ({one_batch_best:.1f} img/s) | vs best in-process ({best:.1f} img/s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, concurrency, p50, p99, rate, failed, server_cpu, client_cpu in rows:
        print(f"| {label} | {concurrency} | {p50:.0f} | {p99:.0f} | {rate:.1f} | {failed} | {server_cpu:.2f} cores "
              f"| {client_cpu:.2f} cores | {rate / one_batch_best:.0%} | {rate / best:.0%} |")
    print(f"\nlogs: {work}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
