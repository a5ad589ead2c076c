"""The generator's memory plan: budget measured after the captioner and rewriter load, and the captioner/rewriter
swapped out of the device while images are made when the budget needs it.

The plan's decisions are checked with a stand-in for the memory query (no GPU here); the swap itself runs with the
real tiny models on the CPU, where moving to host RAM is a no-op, so the test records which models were on the
device while each kind of work ran.
"""

import logging
import random
import threading
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from bitmind.monitoring.monitor import Monitor
from neurons import generator
from tests._tiny_models import one_torch_thread, tiny_models  # noqa: F401 - fixtures
from validator.challenges.cache import ImageCache
from validator.generation.captioner import Captioner
from validator.generation.diffusion import DiffusionModelPool, parse_model_list
from validator.generation.memory import (
    GPU_SHARE,
    HOST_SHARE,
    Residency,
    free_memory_gb,
    modules_gb,
    plan_memory,
)
from validator.generation.pipeline import SyntheticImagePipeline
from validator.generation.prompt_rewriter import PromptRewriter

CUDA = torch.device("cuda:0")
CPU = torch.device("cpu")




def _measure(free_by_type: dict[str, float], asked: list[str]):
    """Stand-in for `free_memory_gb`: fixed GB per device type, recording which device was asked about."""

    def measure(device: torch.device) -> float:
        asked.append(device.type)
        return free_by_type[device.type]

    return measure


@pytest.mark.parametrize(
    ("case", "device", "offload", "free", "helpers", "largest", "budget", "swap", "expected_budget", "asked"),
    [
        ("all fit beside the helpers", CUDA, False, 40.0, 21.5, 10.0, None, False, GPU_SHARE * 40.0, "cuda"),
        ("largest model needs the helpers' memory", CUDA, False, 20.0, 21.5, 36.0, None, True,
         GPU_SHARE * 41.5, "cuda"),
        ("no helpers (static prompts): nothing to swap", CUDA, False, 8.0, 0.0, 36.0, None, False,
         GPU_SHARE * 8.0, "cuda"),
        ("explicit budget that fits beside them", CUDA, False, 40.0, 21.5, 36.0, 20.0, False, 20.0, "cuda"),
        ("explicit budget that does not", CUDA, False, 10.0, 21.5, 10.0, 20.0, True, 20.0, "cuda"),
        ("cpu offload: budget is host RAM, helpers swap", CUDA, True, 64.0, 21.5, 36.0, None, True,
         HOST_SHARE * 64.0, "cpu"),
        ("cpu: host RAM, never swaps", CPU, False, 16.0, 0.5, 36.0, None, False, HOST_SHARE * 16.0, "cpu"),
        ("cpu with an explicit budget", CPU, False, 16.0, 0.5, 36.0, 4.0, False, 4.0, "cpu"),
    ],
)
def test_plan_memory(case, device, offload, free, helpers, largest, budget, swap, expected_budget, asked):
    queried: list[str] = []
    plan = plan_memory(device, helpers, largest, budget_gb=budget, cpu_offload=offload,
                       measure=_measure({"cuda": free, "cpu": free}, queried))
    assert (plan.swap_helpers, plan.budget_gb) == (swap, pytest.approx(expected_budget)), case
    assert queried == [asked], case
    assert f"{free:.1f} GB" in plan.describe() and ("swapped" in plan.describe()) == swap


def test_explicit_budget_beyond_the_gpu_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="validator.generation.memory"):
        plan = plan_memory(CUDA, 6.0, 10.0, budget_gb=80.0, measure=lambda device: 30.0)
    assert plan.swap_helpers and plan.budget_gb == 80.0
    assert any("above the 34.2 GB" in r.getMessage() for r in caplog.records)


def test_memory_query_on_cpu_is_host_ram():
    free = free_memory_gb(CPU)
    assert 0 < free <= psutil.virtual_memory().total / 1e9


def test_modules_gb_counts_parameters_and_buffers_once():
    linear = torch.nn.Linear(10, 10)  # 110 float32 values
    norm = torch.nn.BatchNorm1d(4)  # 8 parameters + 9 buffer values (running mean/var: 4 + 4, count: int64 1)
    assert modules_gb([linear]) == pytest.approx(440 / 1e9)
    assert modules_gb([linear, linear]) == pytest.approx(440 / 1e9)
    assert modules_gb([norm]) == pytest.approx((16 * 4 + 8) / 1e9)


def test_pool_parks_in_host_ram_and_brings_back_without_reloading(tiny_models, monkeypatch):
    import diffusers

    loads = []
    original = diffusers.AutoPipelineForText2Image.from_pretrained
    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained",
                        lambda path, **kw: loads.append(path) or original(path, **kw))
    pool = DiffusionModelPool(parse_model_list(str(tiny_models.sd)), budget_gb=10)
    pool.get("sd")
    pool.park()
    assert pool.parked() == ["sd"] and pool.loaded() == ["sd"]
    image = pool.generate("sd", "a red cat", random.Random(0), resolution=32, steps=1).image
    assert pool.parked() == [] and len(loads) == 1 and image.size == (32, 32)


class _OneImageSource:
    def sample(self, rng):
        return Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8)), 0, {"dataset": "stub"}


def test_swap_plan_keeps_helpers_and_diffusion_models_apart(tiny_models, tmp_path):
    """Under a swap plan, every caption runs with the diffusion models parked and every image with the captioner
    and rewriter in host RAM; models move once per round, not per image."""
    captioner = Captioner(str(tiny_models.blip2), max_new_tokens=3)
    rewriter = PromptRewriter(str(tiny_models.llm), max_new_tokens=4)
    helpers = [captioner.model, rewriter.model]
    plan = plan_memory(CUDA, modules_gb(helpers), 36.0, measure=lambda device: 2.0)  # a GPU too small for both
    assert plan.swap_helpers
    pool = DiffusionModelPool(parse_model_list(str(tiny_models.sd)), plan.budget_gb)
    residency = Residency(plan, CPU, helpers, pool)
    pipeline = SyntheticImagePipeline(pool, ImageCache(tmp_path / "syn"), source=_OneImageSource(),
                                      captioner=captioner, rewriter=rewriter, resolution=32, steps=1, seed=1)
    events = []
    caption, generate, park, move = captioner.caption, pool.generate, pool.park, residency._move

    def recording_caption(image):
        events.append(("caption", residency.on_device, tuple(pool.parked()) == tuple(pool.loaded())))
        return caption(image)

    def recording_generate(*args, **kwargs):
        events.append(("generate", residency.on_device))
        return generate(*args, **kwargs)

    captioner.caption = recording_caption
    pool.generate = recording_generate
    pool.park = lambda: events.append(("park",)) or park()
    residency._move = lambda target, why: events.append(("move", why)) or move(target, why)

    config = {"neuron": {"heartbeat_file": str(tmp_path / "hb.json"), "watchdog_timeout": 0}}
    progress = generator.Progress(Monitor.from_config(config, role="generator"), pipeline.cache, 3)
    g = SimpleNamespace(batch=2, max_images=4, max_failures=3, interval=0.0)
    assert generator._loop(pipeline, residency, g, threading.Event(), progress) == 0

    one_round = [("caption", True, True)] * 2 + [("move", "while images are made")] + [("generate", False)] * 2
    assert events == one_round + [("park",), ("move", "to make prompts")] + one_round
    assert progress.images == 4 and len(pipeline.cache) == 4


def test_resident_plan_moves_nothing(tiny_models, tmp_path):
    pool = DiffusionModelPool(parse_model_list(str(tiny_models.sd)), budget_gb=10)
    plan = plan_memory(CUDA, 1.0, 4.0, measure=lambda device: 40.0)
    residency = Residency(plan, CPU, [torch.nn.Linear(2, 2)], pool)
    pool.get("sd")
    for _ in range(2):
        residency.for_prompts()
        residency.for_images()
    assert residency.on_device and pool.parked() == []

