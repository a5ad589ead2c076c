"""Inpainting in the generator: a tiny StableDiffusionInpaintPipeline built from configs, saved locally and loaded
through the real `AutoPipelineForInpainting.from_pretrained` path, sharing the pool with text-to-image models, and
the generator process writing semi-synthetic items (image + mask + metadata) into the semi-synthetic cache."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from neurons import generator
from tests import _tiny_models, test_generation
from validator.challenges import SyntheticImageSource
from validator.challenges.cache import ImageCache
from validator.challenges.mix import SEMI_SYNTHETIC
from validator.generation.diffusion import (
    DEFAULT_INPAINT_MODELS,
    INPAINTING,
    DiffusionModelPool,
    ModelConfigError,
    parse_model_list,
)
from validator.generation.inpainting import EmptyMaskError, work_size
from validator.generation.tiny_models import build_tiny_sd_inpaint
from validator.region_mask import random_region_mask

pytestmark = pytest.mark.timeout(300)

# Shared fixtures: the tiny models once per session, one torch thread, logging restored after generator.main.
tiny_models = _tiny_models.tiny_models
one_torch_thread = _tiny_models.one_torch_thread
restore_logging = test_generation.restore_logging


@pytest.fixture(scope="module")
def tiny_inpaint(tmp_path_factory):
    return build_tiny_sd_inpaint(tmp_path_factory.mktemp("models") / "tiny-inpaint")


def test_default_inpainting_models_are_the_reference_pair_with_the_auto_pipeline():
    specs = parse_model_list("default", task=INPAINTING)
    assert [spec.path for spec in specs] == [
        "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", "Lykon/dreamshaper-8-inpainting"
    ]
    assert specs == list(DEFAULT_INPAINT_MODELS)
    assert all(spec.task == INPAINTING and spec.pipeline == "AutoPipelineForInpainting" for spec in specs)
    assert parse_model_list("Lykon/dreamshaper-8-inpainting", task=INPAINTING)[0].scheduler == "DEISMultistepScheduler"
    with pytest.raises(ModelConfigError, match="not inpainting models"):
        parse_model_list("sdxl-base", task=INPAINTING)
    with pytest.raises(ModelConfigError, match="not text-to-image models"):
        parse_model_list("sdxl-inpaint")


def test_yaml_entry_naming_only_its_task_gets_the_inpainting_pipeline(tmp_path, tiny_inpaint):
    path = tmp_path / "models.yaml"
    path.write_text(f"- name: mine\n  path: {tiny_inpaint}\n  call_kwargs: {{strength: 0.9}}\n")
    (spec,) = parse_model_list(str(path), task=INPAINTING)
    assert (spec.task, spec.pipeline, spec.call_kwargs) == (INPAINTING, "AutoPipelineForInpainting", {"strength": 0.9})


@pytest.mark.parametrize("size, side, expected", [
    ((32, 32), 64, (64, 64)), ((40, 24), 64, (64, 40)), ((3000, 2000), 1024, (1024, 680)), ((5, 400), 512, (8, 512)),
])
def test_work_size_keeps_the_aspect_at_the_models_side(size, side, expected):
    assert work_size(size, side) == expected


def test_pool_inpaints_small_images_keeping_real_pixels_outside_the_region(tiny_models, tiny_inpaint):
    specs = parse_model_list(str(tiny_models.sd)) + parse_model_list(str(tiny_inpaint), task=INPAINTING)
    pool = DiffusionModelPool(specs, budget_gb=0.0)  # one model at a time: inpainting shares the LRU
    rng = random.Random(0)
    real = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    mask = random_region_mask(real.size, np.random.default_rng(1))
    with pytest.raises(EmptyMaskError):  # nothing to regenerate: refused before any model loads
        pool.inpaint("tiny-inpaint", "a cat", real, np.zeros_like(mask), rng, resolution=64, steps=1)
    assert pool.loaded() == []
    made = pool.inpaint("tiny-inpaint", "a cat", real, mask, rng, resolution=64, steps=1)
    assert type(pool.get("tiny-inpaint")).__name__ == "StableDiffusionInpaintPipeline"
    assert made.image.size == real.size and made.call_args["height"] == 40 and made.call_args["width"] == 64
    before, after = np.asarray(real, dtype=int), np.asarray(made.image, dtype=int)
    assert (after[mask == 0] == before[mask == 0]).all() and (after[mask > 0.99] != before[mask > 0.99]).any()
    everything = pool.inpaint("tiny-inpaint", "a cat", real, np.ones_like(mask), rng, resolution=64, steps=1)
    assert everything.image.size == real.size
    pool.generate("sd", "a cat", rng, resolution=64, steps=1)
    assert pool.loaded() == ["sd"]  # the budget evicted the inpainting model
    with pytest.raises(ModelConfigError, match="not inpainting"):
        pool.inpaint("sd", "a cat", real, mask, rng)


def _image_folder(root, count=3):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):  # smaller than the model's 64 px and not square
        Image.fromarray(rng.integers(0, 255, (36, 52, 3), dtype=np.uint8)).save(root / f"real_{i}.png")
    return root


def test_generator_writes_semi_synthetic_items_with_masks(
    tiny_models, tiny_inpaint, tmp_path, restore_logging, monkeypatch
):
    monkeypatch.setattr("validator.generation.memory.free_memory_gb", lambda device: 5.0)
    argv = [
        "--generator.models", str(tiny_models.sd), "--generator.inpaint_models", str(tiny_inpaint),
        "--generator.inpaint_share", "1", "--generator.captioner", str(tiny_models.blip2),
        "--generator.rewriter", "none", "--generator.device", "cpu", "--generator.resolution", "64",
        "--generator.steps", "1", "--generator.cache_dir", str(tmp_path / "synthetic"),
        "--generator.semi_cache_dir", str(tmp_path / "semi"), "--neuron.state_dir", str(tmp_path / "state"),
        "--generator.real_source", str(_image_folder(tmp_path / "real")), "--generator.max_images", "2",
        "--generator.batch", "2", "--generator.seed", "4",
    ]
    assert generator.main(argv) == 0
    assert len(ImageCache(tmp_path / "synthetic")) == 0
    items = ImageCache(tmp_path / "semi").items()
    assert len(items) == 2 and all(item.mask_path is not None for item in items)
    for item in items:
        meta = json.loads(item.sidecar_path.read_text())["metadata"]
        assert meta["kind"] == SEMI_SYNTHETIC and meta["model"] == "tiny-inpaint" and meta["caption"]
        assert 0.03 <= meta["mask_area"] <= 0.55 and meta["mask_shape"] in ("blob", "ellipse", "rectangle")
        assert Image.open(item.image_path).size == (52, 36)  # the real image's own size
    image, _, metadata, mask = SyntheticImageSource(tmp_path / "semi", kind=SEMI_SYNTHETIC).sample_with_mask(
        np.random.default_rng(0)
    )
    assert metadata["source_type"] == SEMI_SYNTHETIC and mask.shape == (36, 52)
    assert float(mask.mean()) == pytest.approx(metadata["mask_area"], abs=0.01)


@pytest.mark.parametrize("flags, message", [
    (["--generator.inpaint_share", "1.5"], "inpaint_share must be in [0, 1]"),
    (["--generator.inpaint_share", "0.5", "--generator.prompt_mode", "static"], "needs --generator.prompt_mode"),
    (["--generator.inpaint_share", "0.5", "--generator.inpaint_models", "sdxl-base"], "not inpainting models"),
])
def test_bad_inpainting_flags_exit_2(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        generator.main(flags)
    assert exited.value.code == 2 and message in capsys.readouterr().err
