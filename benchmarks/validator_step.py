"""Benchmark: one validator step against 16, 64 and 256 trivial miners on 127.0.0.1.

Prints, per miner count, the median time of each phase of `neurons.validator.Validator.step()` (sampling,
augmentation, JPEG encoding, querying, scoring, persistence), the step's overhead outside the query window (the
target is <= 1 s at 256 miners on 2 CPU cores), and the validator's own CPU time spent inside the query window
(signing, serialising and parsing 256 requests is validator work too, even though it overlaps the miners' answers).

Setup: a LocalChain in a temporary folder; the miners run in `--processes` helper processes (this script with
`--worker`), each serving many `MinerServer`s with a forward that answers a random probability at once; the real
images are the packaged sample (pre-cached; small 32² photos), the fakes a pre-filled synthetic cache of 1024² PNGs
(SDXL's size, so fake steps pay a realistic decode and augmentation); every miner's history is
pre-filled to the full 100-answer window, so scoring and persistence cost what they cost in steady state.

With `--video-share S` a share S of the steps sends a clip (the miners also serve `VideoSynapse` and answer at once):
real clips are the shared clip folder's real ones (`--video-data`), generated ones its generated clips, both
pre-cached as the validator's caches hold them; the table is then printed per modality (a video step's sampling
reads and splices clips, its augmentation runs on every frame, its encoding is the AV1 clip codec).

    /work/venvtest/bin/python benchmarks/validator_step.py [--counts 16,64,256] [--steps 5] [--processes 4]
        [--video-share 0.5]
"""

import argparse
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("READ_ONLY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bitmind.chain.local import LocalChain  # noqa: E402
from bitmind.config import build_config  # noqa: E402
from bitmind.dev_wallets import make_wallet  # noqa: E402
from bitmind.ports import free_port  # noqa: E402
from neurons.validator import Validator, build_parser  # noqa: E402
from validator.challenges import ImageCache, RealImageSource  # noqa: E402
from validator.challenges import parse_dataset_list  # noqa: E402
from validator.video.sources import VideoClipSource  # noqa: E402

PHASES = ("sampling", "augmentation", "encoding", "querying", "scoring", "persistence")
VALIDATOR_STAKE = 100.0
LOOPBACK = "127.0.0.1"


# --- miner worker process -------------------------------------------------------------------------------------
def serve_miners(chain_path: Path, wallet_root: Path, first: int, count: int) -> None:
    """Serve `count` trivial miners, register and publish them on the chain, print READY, serve until stdin closes."""
    from bitmind.protocol import ImageSynapse, VideoSynapse
    from bitmind.transport import MinerServer

    async def forward(synapse: ImageSynapse | VideoSynapse) -> ImageSynapse | VideoSynapse:
        synapse.prediction = random.random()
        return synapse

    chain = LocalChain(chain_path)
    servers = []
    for index in range(first, first + count):
        wallet = make_wallet(wallet_root, f"miner-{index}")
        for _attempt in range(3):  # another worker may grab the same free port in between
            try:
                server = MinerServer(wallet, free_port(), forward, external_ip=LOOPBACK, video_forward=forward).start()
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError(f"miner {index}: no free port after 3 tries")
        servers.append(server)
        chain.register_hotkey(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
        chain.serve_axon(wallet, LOOPBACK, server.port)
    print("READY", flush=True)
    sys.stdin.read()
    for server in servers:
        server.stop()


class Miners:
    """The helper processes serving the miners; `grow_to(n)` starts more."""

    def __init__(self, chain_path: Path, wallet_root: Path, processes: int) -> None:
        self.chain_path, self.wallet_root, self.processes = chain_path, wallet_root, processes
        self.count = 0
        self.workers: list[subprocess.Popen] = []

    def grow_to(self, total: int) -> None:
        missing = total - self.count
        if missing <= 0:
            return
        parts = min(self.processes, missing)
        sizes = [missing // parts + (1 if i < missing % parts else 0) for i in range(parts)]
        started = []
        for size in sizes:
            command = [sys.executable, __file__, "--worker", str(self.chain_path), str(self.wallet_root),
                       str(self.count), str(size)]
            started.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            self.count += size
        for worker in started:
            line = worker.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"a miner worker failed to start (exit {worker.poll()})")
        self.workers += started

    def stop(self) -> None:
        for worker in self.workers:
            worker.stdin.close()
        for worker in self.workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()


# --- validator side -------------------------------------------------------------------------------------------
def prepare_caches(root: Path) -> None:
    """Cache the whole packaged real sample and 16 synthetic images, so no step waits for a filler."""
    source = RealImageSource(parse_dataset_list("packaged"), root / "real_cache", fill_batch=64, seed=0)
    while source.fill_round():
        pass
    synthetic = ImageCache(root / "synthetic_cache")
    for index in range(16):  # 1024² like SDXL's output, smooth enough to compress like a generated image
        bands = [Image.effect_mandelbrot((1024, 1024), (-2 + 0.05 * (index + band), -1.5, 1, 1.5), 64)
                 for band in range(3)]
        synthetic.put(Image.merge("RGB", bands), {"model": "benchmark-mandelbrot", "seed": index})


def prepare_video_caches(root: Path, data: Path, clips: int = 16) -> list[str]:
    """Cache `clips` real and generated clips of `data` where the validator reads them; its video flags."""
    real_spec = f"{data}?labels=0"
    real = VideoClipSource([real_spec], root / "real_video_cache", fill_batch=clips, seed=0)
    generated = VideoClipSource([f"{data}?labels=1"], root / "generated_video", label=1, fill_batch=clips, seed=0)
    if not (real.fill_round() and generated.fill_round()):
        raise SystemExit(f"no clip of {data} could be read: {real.status()} {generated.status()}")
    return [
        "--validator.real_video_datasets", real_spec, "--validator.real_video_cache", str(root / "real_video_cache"),
        "--validator.synthetic_video_cache", str(next(iter(generated.caches.values())).root),
    ]


def prefill_histories(validator: Validator, uids: list[int], length: int, rng: np.random.Generator) -> None:
    """Give `uids` full answer windows through the scorer's public API (steady-state scoring and state size), in
    every modality the scorer weighs."""
    for modality in validator.scorer.modality_weights:
        for _ in range(length):
            validator.scorer.score_challenge(int(rng.integers(2)), uids, rng.random(len(uids)).tolist(),
                                             modality=modality)


def measure(validator: Validator, steps: int) -> dict[str, dict[str, float]]:
    """Per modality, median phase times of `steps` steps (of each modality the validator sends; at most 4x as many
    steps in all), plus step wall time and the validator's CPU time while querying."""
    query = validator.runner.query
    cpu: list[float] = []

    def timed_query(*args):
        started = time.process_time()
        try:
            return query(*args)
        finally:
            cpu.append(time.process_time() - started)

    validator.runner.query = timed_query
    modalities = ["image", *(["video"] if validator.video is not None else [])]
    rows: dict[str, list[dict[str, float]]] = {modality: [] for modality in modalities}
    try:
        for _ in range(steps * 4 if len(modalities) > 1 else steps):
            started = time.perf_counter()
            result = validator.step()
            wall = time.perf_counter() - started
            if result is None or result.challenge is None:
                raise RuntimeError("the step drew no challenge")
            rows[result.modality].append({**result.timings.as_dict(), "wall": wall,
                                          "overhead": wall - result.timings.querying, "query_cpu": cpu[-1],
                                          "answered": result.answered / len(result.uids)})
            if all(len(kept) >= steps for kept in rows.values()):
                break
    finally:
        validator.runner.query = query
    summaries = {}
    for modality, kept in rows.items():
        if not kept:
            continue
        summary = {key: statistics.median(row[key] for row in kept) for key in kept[0]}
        summary["overhead_max"] = max(row["overhead"] for row in kept)
        summary["answered"] = min(row["answered"] for row in kept)
        summary["steps"] = len(kept)
        summaries[modality] = summary
    return summaries


def print_table(results: dict[int, dict[str, dict[str, float]]]) -> None:
    columns = [*PHASES, "overhead", "overhead_max", "query_cpu", "wall"]
    print()
    print("median ms per step (overhead = step wall time outside the query window, overhead_max its worst step; "
          "query_cpu = validator CPU inside the query window)")
    print(f"{'miners':>6} {'modality':>8} {'steps':>5} " + " ".join(f"{name:>12}" for name in columns)
          + f" {'answered':>8}")
    for count, by_modality in results.items():
        for modality, row in by_modality.items():
            cells = " ".join(f"{row[name] * 1000:12.1f}" for name in columns)
            print(f"{count:>6} {modality:>8} {row['steps']:>5} {cells} {row['answered']:8.0%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="16,64,256", help="Comma list of miner counts, ascending.")
    parser.add_argument("--steps", type=int, default=6, help="Measured steps per miner count (after one warm-up).")
    parser.add_argument("--processes", type=int, default=4, help="Helper processes that each stage's new miners share.")
    parser.add_argument("--history", type=int, default=100, help="Answers pre-filled into every miner's history.")
    parser.add_argument("--timeout", type=float, default=9.0, help="The validator's --neuron.timeout.")
    parser.add_argument("--video-share", type=float, default=0.0,
                        help="Share of steps that send a clip (--validator.video_share); 0: images only.")
    parser.add_argument("--video-data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "video",
                        help="Folder of clips with a metadata.csv (path, label) for --video-share.")
    args = parser.parse_args(argv)
    if not 0.0 <= args.video_share <= 1.0:
        parser.error(f"--video-share must be in [0, 1], got {args.video_share}")
    if args.video_share and not (args.video_data / "metadata.csv").is_file():
        parser.error(f"--video-share needs clips: {args.video_data}/metadata.csv not found (--video-data)")
    counts = sorted(int(part) for part in args.counts.split(","))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="validator-bench-") as tmp:
        root = Path(tmp)
        chain_path, wallet_root = root / "chain.sqlite", root / "wallets"
        chain = LocalChain(chain_path)
        wallet = make_wallet(wallet_root, "validator")
        chain.register_hotkey(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address, stake=VALIDATOR_STAKE)
        prepare_caches(root)
        video_flags = ["--validator.video_share", str(args.video_share)]
        if args.video_share:
            video_flags += prepare_video_caches(root, args.video_data)
        miners = Miners(chain_path, wallet_root, args.processes)
        results: dict[int, dict[str, dict[str, float]]] = {}
        validator = None
        rng = np.random.default_rng(0)
        try:
            for count in counts:
                started = time.perf_counter()
                miners.grow_to(count)
                print(f"{count} miners serving ({time.perf_counter() - started:.1f} s to start)", flush=True)
                argv = [
                    "--chain", "local", "--chain.path", str(chain_path),
                    "--wallet.path", str(wallet_root), "--wallet.name", "validator", "--wallet.hotkey", "default",
                    "--neuron.state_dir", str(root / "state"), "--neuron.watchdog_timeout", "0",
                    "--neuron.sync_interval", "0", "--neuron.sample_size", str(count),
                    "--neuron.timeout", str(args.timeout), "--validator.external_ip", LOOPBACK,
                    "--validator.real_datasets", "packaged", "--validator.real_cache", str(root / "real_cache"),
                    "--validator.synthetic_cache", str(root / "synthetic_cache"), "--validator.seed", "1",
                    *video_flags,
                ]
                if validator is not None:
                    validator.close()  # its state is saved; the next one loads it
                validator = Validator(build_config(build_parser(), argv))
                prefill_histories(validator, [uid for uid in validator.scorer.uids if uid != validator.uid],
                                  args.history, rng)
                validator.step()  # warm-up: opens the HTTP connections
                results[count] = measure(validator, args.steps)
                for modality, row in results[count].items():
                    print(f"{count} miners, {modality}: overhead {row['overhead'] * 1000:.0f} ms, query "
                          f"{row['querying'] * 1000:.0f} ms (validator CPU {row['query_cpu'] * 1000:.0f} ms), "
                          f"answered {row['answered']:.0%}", flush=True)
        finally:
            if validator is not None:
                validator.close()
            miners.stop()
            chain.close()
    print_table(results)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, chain_arg, wallets_arg, first_arg, count_arg = sys.argv
        serve_miners(Path(chain_arg), Path(wallets_arg), int(first_arg), int(count_arg))
        raise SystemExit(0)
    raise SystemExit(main())
