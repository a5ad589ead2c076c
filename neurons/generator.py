"""Background generator of synthetic challenge images (run under pm2 beside the validator).

Loop: take a real image (the validator's datasets by default) → caption it with BLIP-2 → rewrite the caption with
an LLM → moderate → generate with a diffusion model → write image + JSON sidecar to the cache the validator reads.
With `--generator.inpaint_share`, that share of the rounds are inpainting rounds instead: each real image gets a
random region regenerated from its caption and goes, with its mask, to the semi-synthetic cache. With
`--generator.video_share`, that share of the rounds make clips with a text-to-video model (same pool and memory
budget) into the clip cache the validator's video challenges read.
Each round picks one model (so a model swap is paid once per round, not per image), makes `--generator.batch`
prompts and then the images with that model, then waits `--generator.interval` seconds. A failed prompt or image is
logged and skipped; SIGINT/SIGTERM stop after the current one.

Memory: see validator/generation/memory.py (the plan is logged at start). Monitoring like the miner and validator:
a heartbeat file (<neuron.state_dir>/heartbeat.json: images, failures, cache size, state) rewritten after every
prompt and image, optional Prometheus metrics, and a watchdog that exits with code 75 when nothing progresses for
`--neuron.watchdog_timeout` seconds so pm2 restarts the process.

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

from bitmind.config import (
    DEFAULT_HOME,
    add_metrics_args,
    add_state_dir_arg,
    build_config,
    new_parser,
    setup_logging,
)
from bitmind.monitoring.monitor import Monitor, add_monitoring_args
from validator.challenges.cache import ImageCache
from validator.challenges.dataset_spec import parse_dataset_list
from validator.challenges.real import RealImageSource
from validator.generation.captioner import DEFAULT_CAPTIONER, Captioner
from validator.generation.diffusion import (
    INPAINTING,
    TEXT_TO_VIDEO,
    DiffusionModelPool,
    ModelConfigError,
    NoModelAvailable,
    check_pipeline_classes,
    parse_model_list,
)
from validator.generation.memory import Residency, modules_gb, plan_memory
from validator.generation.pipeline import (
    PROMPT_MODES,
    GenerationRecord,
    NoSourceImage,
    PromptRecord,
    SyntheticImagePipeline,
)
from validator.generation.prompt_rewriter import DEFAULT_REWRITER, PromptRewriter
from validator.video.cache import ClipCache

__all__ = ["Progress", "add_generator_args", "build_parser", "main", "run"]

log = logging.getLogger(__name__)

NO_REWRITER = "none"
SOURCE_WAIT_S = 5.0
# The first image of a model includes loading it, and downloading it on first use (FLUX.1-dev is ~34 GB).
WATCHDOG_TIMEOUT_S = 3600.0


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
    add("--generator.semi_cache_dir", type=str, default=str(DEFAULT_HOME / "validator" / "semi_synthetic_cache"),
        help="Folder of the semi-synthetic cache (inpainted real images with their masks) the validator reads; "
             "capped like the synthetic cache (cache_max_gb, cache_max_items).")
    add("--generator.inpaint_share", type=float, default=0.0,
        help="Share of rounds that inpaint a random region (5 to 50 percent of the area) of a real image instead of "
             "generating a whole one; needs prompt_mode caption. 0: no semi-synthetic images.")
    add("--generator.inpaint_models", type=str, default="default",
        help="Inpainting models used when inpaint_share > 0: 'default' (SDXL inpainting 0.1 and DreamShaper 8 "
             "inpainting), a comma list of built-in names / hub ids / local pipeline folders, or a YAML file. They "
             "share the memory budget and least-recently-used eviction with the text-to-image models.")
    add("--generator.video_share", type=float, default=0.0,
        help="Share of rounds that make clips with a text-to-video model for the validator's video challenges. "
             "0: no clips.")
    add("--generator.video_models", type=str, default="default",
        help="Text-to-video models used when video_share > 0: 'default' (Mochi 1, CogVideoX-5b, "
             "AnimateDiff-Lightning), a comma list of built-in names / hub ids / local pipeline folders, or a YAML "
             "file. They share the memory budget and least-recently-used eviction with the image models.")
    add("--generator.video_cache_dir", type=str, default=str(DEFAULT_HOME / "validator" / "synthetic_video_cache"),
        help="Folder of the generated-clip cache the validator reads (--validator.synthetic_video_cache).")
    add("--generator.video_cache_max_gb", type=float, default=10.0,
        help="Size cap of the clip cache; oldest clips go first.")
    add("--generator.video_frames", type=int, default=0,
        help="Frames per clip for every text-to-video model, e.g. 4 for tiny test models (0: each model's own).")
    add("--generator.captioner", type=str, default=DEFAULT_CAPTIONER, help="BLIP-2 hub id or local folder.")
    add("--generator.rewriter", type=str, default=DEFAULT_REWRITER,
        help=f"Chat LLM (hub id or local folder) that rewrites captions into prompts, or '{NO_REWRITER}'.")
    add("--generator.rewriter_precision", choices=("4bit", "full"), default="4bit",
        help="Load the rewriter 4-bit with bitsandbytes (GPU only; CPUs always load full precision).")
    add("--generator.device", type=str, default="auto", help="Torch device: auto (CUDA when present), cpu, cuda:N.")
    add("--generator.vram_budget_gb", type=float, default=0.0,
        help="GB the loaded diffusion models may hold (least recently used ones are dropped beyond it). 0: measured "
             "after the captioner and rewriter load: 0.95 of the free GPU memory, all three staying resident, when "
             "the largest configured model's vram_gb fits there; otherwise the captioner and rewriter wait in host "
             "RAM during each round's images (the diffusion models wait there during its prompts) and the budget "
             "adds their memory. A set value is used as given, with the same swap when it does not fit beside them. "
             "On CPU or with --generator.cpu_offload it counts host RAM (0: 0.8 of what is available).")
    add("--generator.cpu_offload", action="store_true",
        help="enable_model_cpu_offload: diffusion weights stay in host RAM, each component visits the GPU while "
             "it runs; the captioner and rewriter also wait in host RAM while images are made.")
    add("--generator.batch", type=int, default=10, help="Images per round, all made with one randomly chosen model.")
    add("--generator.interval", type=float, default=0.0, help="Seconds to wait between rounds.")
    add("--generator.max_images", type=int, default=0, help="Stop after this many images (0: run until stopped).")
    add("--generator.max_failures", type=int, default=50, help="Exit with an error after this many failures in a row.")
    add("--generator.real_source", type=str, default="default",
        help="Real images to caption: 'default' (the validator's datasets), 'packaged' (the small sample shipped "
             "with the package), or a comma list of hub ids / local parquet files or folders / image folders, each "
             "optionally with ?split=&labels=0 (see validator/challenges/dataset_spec.py).")
    add("--generator.real_cache_dir", type=str, default="",
        help="Where the generator caches the real images it captions (empty: <neuron.state_dir>/real_cache).")
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
    add("--generator.worker_id", type=int, default=0,
        help="This worker's number when several generators (one per GPU) fill one cache: added to a fixed "
             "--generator.seed so workers draw different prompts and images, and reported in logs and heartbeat. "
             "Give each worker its own --neuron.state_dir and metrics port.")


def build_parser() -> argparse.ArgumentParser:
    """`--generator.*` plus the monitoring flags the miner and validator have (no `--neuron.device`: the device is
    `--generator.device`)."""
    parser = new_parser("Generate synthetic challenge images into the validator's cache.")
    add_generator_args(parser)
    add_state_dir_arg(parser, "generator")
    add_metrics_args(parser)
    add_monitoring_args(parser)
    parser.set_defaults(**{"neuron.watchdog_timeout": WATCHDOG_TIMEOUT_S})
    return parser


def _check(parser: argparse.ArgumentParser, config: Any) -> None:
    """Reject out-of-range values and unusable model lists before anything is loaded (argparse error, exit 2)."""
    g = config.generator
    problems = []
    if g.cache_max_gb <= 0 or g.real_cache_max_gb <= 0:
        problems.append("cache sizes must be positive")
    counts = (g.cache_max_items, g.max_images, g.steps, g.interval, g.torch_threads, g.worker_id)
    if min(counts) < 0 or min(g.batch, g.max_failures) < 1:
        problems.append(
            "cache_max_items, max_images, steps, interval, torch_threads and worker_id must be >= 0; batch and "
            "max_failures >= 1"
        )
    if g.resolution and (g.resolution % 8 or not 8 <= g.resolution <= 4096):
        problems.append(f"resolution must be 0 or a multiple of 8 in [8, 4096], got {g.resolution}")
    if g.vram_budget_gb < 0:
        problems.append("vram_budget_gb must be >= 0")
    if g.device != "auto":
        try:
            device = torch.device(g.device)
        except RuntimeError as err:
            problems.append(f"--generator.device: {err}")
        else:
            if device.type == "cuda" and not torch.cuda.is_available():
                problems.append(f"--generator.device {g.device}: no CUDA device is available (use auto or cpu)")
    n = config.neuron
    if not n.watchdog_timeout >= 0:
        problems.append(f"--neuron.watchdog_timeout must be >= 0 seconds, got {n.watchdog_timeout}")
    if not 0 <= n.metrics_port <= 65535:
        problems.append(f"--neuron.metrics_port must be in 0..65535, got {n.metrics_port}")
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
    if not 0.0 <= g.inpaint_share <= 1.0:
        problems.append(f"--generator.inpaint_share must be in [0, 1], got {g.inpaint_share}")
    elif g.inpaint_share > 0:
        if g.prompt_mode != "caption":
            problems.append("--generator.inpaint_share needs --generator.prompt_mode caption (a real image to inpaint)")
        try:
            parse_model_list(g.inpaint_models, task=INPAINTING)
        except ModelConfigError as err:
            problems.append(f"--generator.inpaint_models: {err}")
    if not 0.0 <= g.video_share <= 1.0:
        problems.append(f"--generator.video_share must be in [0, 1], got {g.video_share}")
    elif g.video_share > 0:
        try:
            parse_model_list(g.video_models, task=TEXT_TO_VIDEO)
        except ModelConfigError as err:
            problems.append(f"--generator.video_models: {err}")
    if g.video_frames < 0 or g.video_cache_max_gb <= 0:
        problems.append("--generator.video_frames must be >= 0 and --generator.video_cache_max_gb positive")
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
    cache_dir = g.real_cache_dir or str(Path(config.neuron.state_dir).expanduser() / "real_cache")
    source = RealImageSource(
        datasets, cache_dir, max_bytes=int(g.real_cache_max_gb * 1e9), image_format="png", seed=seed
    )
    added = source.fill_round()
    log.info("real-image source: %d sources, %d images cached (%d added now)", len(source.specs), len(source), added)
    source.start()
    return source


def _load_helpers(g: Any, device: torch.device) -> tuple[Captioner, PromptRewriter | None]:
    """The captioner and (unless 'none') the rewriter, loaded on `device`."""
    captioner = Captioner(g.captioner, device=str(device))
    rewriter = None
    if g.rewriter != NO_REWRITER:
        rewriter = PromptRewriter(g.rewriter, device=str(device), quantize_4bit=g.rewriter_precision == "4bit")
    return captioner, rewriter


def run(config: Any, stop: threading.Event) -> int:
    """Generate until `stop` is set or `max_images` are written; 0 on a clean stop, 1 when nothing can work.

    Start-up order matters for memory: the captioner and rewriter load first, then the memory plan measures what is
    left for the diffusion models (validator/generation/memory.py). The monitor (heartbeat, metrics, watchdog) starts
    once loading is done, so a long first download is not mistaken for a hang.
    """
    g = config.generator
    seed = g.seed + g.worker_id if g.seed >= 0 else random.SystemRandom().randrange(2**32)
    device = torch.device(_device(g.device))
    if g.torch_threads:
        torch.set_num_threads(g.torch_threads)
    log.info("generator worker %d starting: device %s, prompt mode %s, seed %d, cache %s",
             g.worker_id, device, g.prompt_mode, seed, g.cache_dir)
    specs = parse_model_list(g.models)
    if g.inpaint_share > 0:
        specs += parse_model_list(g.inpaint_models, task=INPAINTING)
    if g.video_share > 0:
        specs += parse_model_list(g.video_models, task=TEXT_TO_VIDEO)
    source = None
    try:
        check_pipeline_classes(specs)
        captioner, rewriter = _load_helpers(g, device) if g.prompt_mode == "caption" else (None, None)
        helpers = [helper.model for helper in (captioner, rewriter) if helper is not None]
        plan = plan_memory(device, modules_gb(helpers), max(spec.vram_gb or 0.0 for spec in specs),
                           budget_gb=g.vram_budget_gb or None, cpu_offload=g.cpu_offload)
        log.info(plan.describe())
        pool = DiffusionModelPool(specs, plan.budget_gb, device=str(device), cpu_offload=g.cpu_offload)
        if captioner is not None:
            source = _real_source(config, seed)
        monitor = Monitor.from_config(config, role="generator")
    except Exception as err:  # noqa: BLE001 - a model, dataset or port that cannot be used is fatal at start
        log.error("cannot start: %s: %s", type(err).__name__, err)
        if source is not None:
            source.stop()
        return 1
    cache = ImageCache(g.cache_dir, max_bytes=int(g.cache_max_gb * 1e9), max_items=g.cache_max_items or None)
    semi_cache = None
    if g.inpaint_share > 0:
        semi_cache = ImageCache(
            g.semi_cache_dir, max_bytes=int(g.cache_max_gb * 1e9), max_items=g.cache_max_items or None
        )
    pipeline = SyntheticImagePipeline(
        pool, cache, source=source, captioner=captioner, rewriter=rewriter, prompt_mode=g.prompt_mode,
        resolution=g.resolution or None, steps=g.steps or None, image_format=g.image_format, seed=seed,
        semi_cache=semi_cache, inpaint_share=g.inpaint_share,
        video_cache=ClipCache(g.video_cache_dir, max_bytes=int(g.video_cache_max_gb * 1e9)) if g.video_share else None,
        video_share=g.video_share, video_frames=g.video_frames or None,
    )
    progress = Progress(monitor, cache, g.max_failures)
    progress.beat("started", worker=g.worker_id, device=str(device), memory_budget_gb=round(plan.budget_gb, 2),
                  helpers_swapped=plan.swap_helpers)
    try:
        code = _loop(pipeline, Residency(plan, device, helpers, pool), g, stop, progress)
        progress.beat("stopped", exit_code=code)
        return code
    finally:
        if source is not None:
            source.stop()
        pool.close()
        monitor.close()


class Progress:
    """This run's counts, reported after every prompt and image: heartbeat (which kicks the watchdog), metrics,
    wandb and one log line per event."""

    def __init__(self, monitor: Monitor, cache: Any, max_failures: int) -> None:
        self.monitor = monitor
        self.cache = cache
        self.max_failures = max_failures
        self.images = self.failures = self.failures_in_a_row = 0
        self.cache_items, self.cache_mb = len(cache), cache.total_bytes() / 1e6

    def beat(self, state: str, **extra: Any) -> None:
        fields = {
            "state": state, "images": self.images, "failures": self.failures,
            "failures_in_a_row": self.failures_in_a_row, "cache_items": self.cache_items,
            "cache_mb": round(self.cache_mb, 3), **extra,
        }
        self.monitor.beat(**fields)
        self.monitor.wandb.log({k: v for k, v in fields.items() if isinstance(v, (int, float))})

    def made(self, record: GenerationRecord) -> None:
        self.images += 1
        self.failures_in_a_row = 0
        self.cache_items, self.cache_mb = len(self.cache), self.cache.total_bytes() / 1e6
        meta = record.metadata
        log.info(
            "image %d: kind=%s model=%s steps=%s seconds=%.1f cache=%d items/%.1f MB file=%s",
            self.images, meta["kind"], meta["model"], meta["call_args"].get("num_inference_steps", "default"),
            meta["timings"]["total_s"], self.cache_items, self.cache_mb, record.path.name,
        )
        self.monitor.metrics.record_image(meta["model"], self.cache_items)
        self.beat("images", model=meta["model"])

    def failed(self, stage: str, err: Exception) -> bool:
        """Count a failed prompt or image; True when `max_failures` in a row were reached."""
        self.failures += 1
        self.failures_in_a_row += 1
        log.warning("%s failed (%d in a row): %s: %s", stage, self.failures_in_a_row, type(err).__name__, err)
        self.monitor.metrics.record_error(stage)
        self.beat(stage, last_error=f"{type(err).__name__}: {err}")
        if self.failures_in_a_row >= self.max_failures:
            log.error("stopping after %d failures in a row", self.failures_in_a_row)
            return True
        return False


def _wait(stop: threading.Event, seconds: float, progress: Progress, state: str) -> None:
    """Wait `seconds` (or until stopped), beating meanwhile: a planned wait is not a hang for the watchdog."""
    watchdog = progress.monitor.watchdog
    step = watchdog.timeout_s / 3 if watchdog is not None else seconds
    end = time.monotonic() + seconds
    progress.beat(state)
    while not stop.is_set() and (left := end - time.monotonic()) > 0:
        stop.wait(min(left, step))
        progress.beat(state)


def _prompts(pipeline: SyntheticImagePipeline, count: int, stop: threading.Event, progress: Progress
             ) -> list[PromptRecord] | None:
    """`count` prompts (fewer when stopped); None after `max_failures` failures in a row."""
    prompts: list[PromptRecord] = []
    while len(prompts) < count and not stop.is_set():
        try:
            prompts.append(pipeline.make_prompt())
        except NoSourceImage:
            log.info("no real image cached yet; waiting %.0f s for the real-image filler", SOURCE_WAIT_S)
            _wait(stop, SOURCE_WAIT_S, progress, "waiting_for_real_images")
            continue
        except Exception as err:  # noqa: BLE001 - one bad prompt must not stop the generator
            if progress.failed("prompt", err):
                return None
            continue
        progress.beat("prompts")
    return prompts


def _loop(pipeline: SyntheticImagePipeline, residency: Residency, g: Any, stop: threading.Event,
          progress: Progress) -> int:
    """Rounds of `batch` images with one model each: the round's prompts first, then its images (so a swap plan
    moves models once per round); returns the exit code."""
    while not stop.is_set():
        try:
            model = pipeline.pick_model(pipeline.pick_task())
        except NoModelAvailable as err:
            log.error("stopping: %s", err)
            return 1
        count = min(g.batch, g.max_images - progress.images) if g.max_images else g.batch
        residency.for_prompts()
        prompts = _prompts(pipeline, count, stop, progress)
        if prompts is None:
            return 1
        residency.for_images()
        for prompt in prompts:
            if stop.is_set():
                break
            try:
                record = pipeline.render(prompt, model)
            except NoModelAvailable as err:
                log.error("stopping: %s", err)
                return 1
            except Exception as err:  # noqa: BLE001 - one bad image must not stop the generator
                if progress.failed("image", err):
                    return 1
                continue
            progress.made(record)
        if g.max_images and progress.images >= g.max_images:
            log.info("wrote %d images (max_images); stopping", progress.images)
            break
        _wait(stop, g.interval, progress, "idle")
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
