"""Background generator of synthetic challenge images (run under pm2 beside the validator).

Loop: take a real image (the validator's datasets by default) → caption it with BLIP-2 → rewrite the caption with
an LLM → moderate → generate with a diffusion model → write image + JSON sidecar to the cache the validator reads.
Each round picks one model (so a model swap is paid once per round, not per image) and makes `--generator.batch`
images with it, then waits `--generator.interval` seconds. A failed image is logged and skipped; SIGINT/SIGTERM
stop after the current image.

Offline demo with tiny local models (see validator/generation/tiny_models.py):
    python -m neurons.generator --generator.models /m/sd --generator.captioner /m/blip2 \
        --generator.rewriter /m/llm --generator.real_source packaged --generator.resolution 64 \
        --generator.steps 2 --generator.device cpu --generator.torch_threads 1 --generator.max_images 4
"""

import argparse
import logging
import random
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from bitmind.config import DEFAULT_HOME, build_config, new_parser, setup_logging
from validator.challenges.cache import ImageCache
from validator.challenges.real import RealImageSource, parse_dataset_list
from validator.generation.captioner import DEFAULT_CAPTIONER, Captioner
from validator.generation.diffusion import DiffusionModelPool, ModelConfigError, NoModelAvailable, parse_model_list
from validator.generation.pipeline import PROMPT_MODES, NoSourceImage, SyntheticImagePipeline
from validator.generation.prompt_rewriter import DEFAULT_REWRITER, PromptRewriter

__all__ = ["add_generator_args", "main", "run"]

log = logging.getLogger(__name__)

NO_REWRITER = "none"
SOURCE_WAIT_S = 5.0


def add_generator_args(parser: argparse.ArgumentParser) -> None:
    """The `--generator.*` flags."""
    add = parser.add_argument
    add("--generator.cache_dir", type=str, default=str(DEFAULT_HOME / "validator" / "synthetic_cache"),
        help="Folder of the synthetic-image cache the validator reads.")
    add("--generator.cache_max_gb", type=float, default=20.0, help="Size cap of the cache; oldest images go first.")
    add("--generator.cache_max_items", type=int, default=0, help="Item cap of the cache (0: size cap only).")
    add("--generator.image_format", choices=("png", "jpeg"), default="png", help="File format of cached images.")
    add("--generator.models", type=str, default="default",
        help="Diffusion models: 'default', a comma list of built-in names / hub ids / local pipeline folders, "
             "or a YAML file with per-model arguments (see validator/generation/diffusion.py).")
    add("--generator.captioner", type=str, default=DEFAULT_CAPTIONER, help="BLIP-2 hub id or local folder.")
    add("--generator.rewriter", type=str, default=DEFAULT_REWRITER,
        help=f"Chat LLM (hub id or local folder) that rewrites captions into prompts, or '{NO_REWRITER}'.")
    add("--generator.rewriter_precision", choices=("4bit", "full"), default="4bit",
        help="Load the rewriter 4-bit with bitsandbytes (GPU only; CPUs always load full precision).")
    add("--generator.device", type=str, default="auto", help="Torch device: auto (CUDA when present), cpu, cuda:N.")
    add("--generator.vram_budget_gb", type=float, default=0.0,
        help="Memory the loaded diffusion models may use; least recently used ones are dropped beyond it "
             "(0: 95%% of the GPU memory free after loading the captioner and rewriter).")
    add("--generator.cpu_offload", action="store_true",
        help="enable_model_cpu_offload: weights stay in host RAM, each component visits the GPU while it runs.")
    add("--generator.batch", type=int, default=10, help="Images per round, all made with one randomly chosen model.")
    add("--generator.interval", type=float, default=0.0, help="Seconds to wait between rounds.")
    add("--generator.max_images", type=int, default=0, help="Stop after this many images (0: run until stopped).")
    add("--generator.max_failures", type=int, default=50, help="Exit with an error after this many failures in a row.")
    add("--generator.real_source", type=str, default="default",
        help="Real images to caption: 'default' (the validator's datasets), 'packaged' (the small sample shipped "
             "with the package), or a comma list of hub ids / local parquet files or folders / image folders, each "
             "optionally with ?split=&labels=0 (see validator/challenges/real.py).")
    add("--generator.real_cache_dir", type=str, default=str(DEFAULT_HOME / "generator" / "real_cache"),
        help="Where the generator caches the real images it captions.")
    add("--generator.real_cache_max_gb", type=float, default=2.0, help="Size cap of that real-image cache.")
    add("--generator.resolution", type=int, default=0,
        help="Output side in pixels for every model, a multiple of 8 (0: each model's own resolution).")
    add("--generator.steps", type=int, default=0,
        help="Denoising steps for every model, e.g. 2 for tiny test models (0: each model's own setting).")
    add("--generator.prompt_mode", choices=PROMPT_MODES, default="caption",
        help="caption: prompts from captions of real images; static: a built-in prompt list (no captioner).")
    add("--generator.torch_threads", type=int, default=0,
        help="CPU threads torch may use (0: torch's default); 1 suits tiny demo models on a busy machine.")
    add("--generator.seed", type=int, default=-1, help="Seed of all random draws (-1: a fresh random seed).")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Generate synthetic challenge images into the validator's cache.")
    add_generator_args(parser)
    return parser


def _check(parser: argparse.ArgumentParser, config: Any) -> None:
    """Reject out-of-range values and unusable model lists before anything is loaded (argparse error, exit 2)."""
    g = config.generator
    problems = []
    if g.cache_max_gb <= 0 or g.real_cache_max_gb <= 0:
        problems.append("cache sizes must be positive")
    counts = (g.cache_max_items, g.max_images, g.steps, g.interval, g.torch_threads)
    if min(counts) < 0 or min(g.batch, g.max_failures) < 1:
        problems.append(
            "cache_max_items, max_images, steps, interval and torch_threads must be >= 0; batch and max_failures >= 1"
        )
    if g.resolution and (g.resolution % 8 or not 8 <= g.resolution <= 4096):
        problems.append(f"resolution must be 0 or a multiple of 8 in [8, 4096], got {g.resolution}")
    if g.vram_budget_gb < 0:
        problems.append("vram_budget_gb must be >= 0")
    if g.device != "auto":
        try:
            torch.device(g.device)
        except RuntimeError as err:
            problems.append(f"--generator.device: {err}")
    for flag in ("captioner", "rewriter"):
        value = str(g[flag])
        if value != NO_REWRITER and value.startswith(("/", ".", "~")) and not Path(value).expanduser().exists():
            problems.append(f"--generator.{flag}: no such folder {value}")
    if g.captioner == NO_REWRITER and g.prompt_mode == "caption":
        problems.append("prompt_mode caption needs a captioner (or use --generator.prompt_mode static)")
    try:
        parse_model_list(g.models)
    except ModelConfigError as err:
        problems.append(f"--generator.models: {err}")
    problems.extend(_real_source_problems(g.real_source))
    if problems:
        parser.error("; ".join(problems))


def _real_source_problems(value: str) -> list[str]:
    """Malformed dataset options, and local dataset paths that do not exist."""
    if value == "default":
        return []
    try:
        specs = parse_dataset_list(value)
    except ValueError as err:
        return [f"--generator.real_source: {err}"]
    problems = []
    for spec in specs:
        if not spec.is_hub and not any(c in spec.path for c in "*?[") and not Path(spec.path).expanduser().exists():
            problems.append(f"--generator.real_source: {spec.path} is neither a local file or folder nor a hub id")
    return problems


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _real_source(config: Any, seed: int):
    """A RealImageSource for the configured datasets, filled once now and then by its background thread."""
    g = config.generator
    if g.real_source == "default":
        datasets = None
    else:
        datasets = parse_dataset_list(g.real_source)
    source = RealImageSource(
        datasets, g.real_cache_dir, max_bytes=int(g.real_cache_max_gb * 1e9), image_format="png", seed=seed
    )
    added = source.fill_round()
    log.info("real-image source: %d sources, %d images cached (%d added now)", len(source.specs), len(source), added)
    source.start()
    return source


def run(config: Any, stop: threading.Event) -> int:
    """Generate until `stop` is set or `max_images` are written; 0 on a clean stop, 1 when nothing can work."""
    g = config.generator
    seed = g.seed if g.seed >= 0 else random.SystemRandom().randrange(2**32)
    device = _device(g.device)
    if g.torch_threads:
        torch.set_num_threads(g.torch_threads)
    caption_mode = g.prompt_mode == "caption"
    log.info("generator starting: device %s, prompt mode %s, seed %d, cache %s",
             device, g.prompt_mode, seed, g.cache_dir)
    source = captioner = rewriter = None
    try:
        pool = DiffusionModelPool(parse_model_list(g.models), device=device, budget_gb=g.vram_budget_gb or None,
                                  cpu_offload=g.cpu_offload)
        if caption_mode:
            captioner = Captioner(g.captioner, device=device)
            if g.rewriter != NO_REWRITER:
                rewriter = PromptRewriter(g.rewriter, device=device, quantize_4bit=g.rewriter_precision == "4bit")
            source = _real_source(config, seed)
    except Exception as err:  # noqa: BLE001 - a model or dataset that cannot load is fatal at start
        log.error("cannot start: %s: %s", type(err).__name__, err)
        if source is not None:
            source.stop()
        return 1
    cache = ImageCache(g.cache_dir, max_bytes=int(g.cache_max_gb * 1e9), max_items=g.cache_max_items or None)
    pipeline = SyntheticImagePipeline(
        pool, cache, source=source, captioner=captioner, rewriter=rewriter, prompt_mode=g.prompt_mode,
        resolution=g.resolution or None, steps=g.steps or None, image_format=g.image_format, seed=seed,
    )
    try:
        return _loop(pipeline, g, stop)
    finally:
        if source is not None:
            source.stop()
        pool.close()


def _loop(pipeline: SyntheticImagePipeline, g: Any, stop: threading.Event) -> int:
    """Rounds of `batch` images with one model each; returns the exit code."""
    written = failures = 0
    while not stop.is_set():
        try:
            model = pipeline.pick_model()
        except NoModelAvailable as err:
            log.error("stopping: %s", err)
            return 1
        for _ in range(g.batch):
            if stop.is_set() or (g.max_images and written >= g.max_images):
                break
            try:
                record = pipeline.run_once(model)
            except NoModelAvailable as err:
                log.error("stopping: %s", err)
                return 1
            except NoSourceImage:
                log.info("no real image cached yet; waiting %.0f s for the real-image filler", SOURCE_WAIT_S)
                stop.wait(SOURCE_WAIT_S)
                continue
            except Exception as err:  # noqa: BLE001 - one bad image must not stop the generator
                failures += 1
                log.warning("image failed (%d in a row): %s: %s", failures, type(err).__name__, err)
                if failures >= g.max_failures:
                    log.error("stopping after %d failures in a row", failures)
                    return 1
                continue
            failures = 0
            written += 1
            meta = record.metadata
            log.info(
                "image %d: model=%s steps=%s seconds=%.1f cache=%d items/%.1f MB file=%s",
                written, meta["model"], meta["call_args"].get("num_inference_steps", "default"),
                meta["timings"]["total_s"], len(pipeline.cache), pipeline.cache.total_bytes() / 1e6, record.path.name,
            )
        if g.max_images and written >= g.max_images:
            log.info("wrote %d images (max_images); stopping", written)
            break
        stop.wait(g.interval)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse flags, install SIGINT/SIGTERM handlers that stop after the current image, and run."""
    parser = build_parser()
    config = build_config(parser, argv)
    _check(parser, config)
    setup_logging(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("received %s: stopping after the current image", signal.Signals(signum).name)
        stop.set()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    start = time.monotonic()
    try:
        code = run(config, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("generator exiting with code %d after %.0f s", code, time.monotonic() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
