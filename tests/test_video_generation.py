"""Text-to-video in the generator: the default model list, tiny AnimateDiff pipelines built from configs and loaded
through the real `from_pretrained` code (a whole pipeline folder, and a base model + single-file motion adapter the
way AnimateDiff-Lightning loads), the pool's clips, and the generator process writing clips the validator reads."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import neurons.generator as generator
from tests._tiny_models import one_torch_thread, tiny_models  # noqa: F401 - fixtures
from tests.test_generation import restore_logging  # noqa: F401 - a fixture
from validator.generation.diffusion import (
    DEFAULT_VIDEO_MODELS,
    TEXT_TO_VIDEO,
    DiffusionModelPool,
    GeneratedClip,
    ModelConfigError,
    check_pipeline_classes,
    parse_model_list,
)
from validator.generation.tiny_models import build_tiny_text_to_video
from validator.generation.video import clip_frames
from validator.video.cache import ClipCache
from validator.video.sources import SyntheticVideoSource

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    return build_tiny_text_to_video(tmp_path_factory.mktemp("tiny_video"))


def test_default_video_models_are_the_founding_list_with_real_classes():
    paths = {spec.name: spec.path for spec in DEFAULT_VIDEO_MODELS}
    assert paths == {"mochi-1": "genmo/mochi-1-preview", "cogvideox-5b": "THUDM/CogVideoX-5b",
                     "animatediff-lightning": "emilianJR/epiCRealism"}
    check_pipeline_classes(list(DEFAULT_VIDEO_MODELS))  # every pipeline and scheduler class exists in diffusers
    lightning = next(spec for spec in DEFAULT_VIDEO_MODELS if spec.name == "animatediff-lightning")
    assert lightning.motion_adapter == "ByteDance/AnimateDiff-Lightning"
    assert all(spec.task == TEXT_TO_VIDEO and spec.fps and spec.vram_gb for spec in DEFAULT_VIDEO_MODELS)
    # each clip covers the validator's 2 s window at the model's own rate
    assert all(spec.call_kwargs["num_frames"] / spec.fps >= 1.9 for spec in DEFAULT_VIDEO_MODELS)
    assert parse_model_list("default", task=TEXT_TO_VIDEO) == list(DEFAULT_VIDEO_MODELS)


def test_video_model_lists_take_folders_and_refuse_image_models(tiny_video, tmp_path):
    pipeline, _ = tiny_video
    (spec,) = parse_model_list(str(pipeline), task=TEXT_TO_VIDEO)
    assert spec.task == TEXT_TO_VIDEO and spec.pipeline == "DiffusionPipeline"
    with pytest.raises(ModelConfigError, match="not text-to-video"):
        parse_model_list("sdxl-base", task=TEXT_TO_VIDEO)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"name": "x", "path": str(pipeline), "task": TEXT_TO_VIDEO,
                                    "motion_adapter_file": "../../etc/passwd"}]))
    with pytest.raises(ModelConfigError, match="motion_adapter_file"):
        parse_model_list(str(bad), task=TEXT_TO_VIDEO)


def test_pool_makes_clips_from_a_pipeline_folder_and_from_a_single_file_adapter(tiny_video, tiny_models, tmp_path):
    pipeline, adapter = tiny_video
    entries = tmp_path / "video.yaml"
    entries.write_text(yaml.safe_dump([
        str(pipeline),
        {"name": "tiny-lightning", "task": TEXT_TO_VIDEO, "path": str(tiny_models.sd), "pipeline": "AnimateDiffPipeline",
         "motion_adapter": str(adapter), "motion_adapter_file": "diffusion_pytorch_model.safetensors",
         "scheduler": "EulerDiscreteScheduler", "scheduler_kwargs": {"timestep_spacing": "trailing"}, "fps": 12},
    ]))
    specs = parse_model_list(str(entries), task=TEXT_TO_VIDEO) + parse_model_list(str(tiny_models.sd))
    pool = DiffusionModelPool(specs, budget_gb=8.0)
    import random

    rng = random.Random(0)
    for name, fps in (("pipeline", 8.0), ("tiny-lightning", 12.0)):
        clip = pool.generate_video(name, "a cat on a beach", rng, resolution=64, steps=1, frames=3)
        assert isinstance(clip, GeneratedClip) and clip.frames.shape == (3, 64, 64, 3)
        assert clip.frames.dtype == np.uint8 and clip.fps == fps and clip.call_args["num_frames"] == 3
    assert pool.get("tiny-lightning").scheduler.config.timestep_spacing == "trailing"
    assert set(pool.loaded()) == {"pipeline", "tiny-lightning"}  # one pool and budget for both modalities
    with pytest.raises(ModelConfigError, match="text-to-video"):
        pool.generate_video("sd", "a cat", rng)


def test_clip_frames_accepts_pipeline_outputs_and_refuses_others():
    pil = [Image.new("RGB", (8, 6), (10, 20, 30))] * 2
    assert clip_frames(pil).shape == (2, 6, 8, 3)
    floats = clip_frames(np.full((3, 6, 8, 3), 0.5, dtype=np.float32))
    assert floats.dtype == np.uint8 and floats[0, 0, 0, 0] == 128
    assert clip_frames(torch.zeros(2, 4, 4, 1)).shape == (2, 4, 4, 3)
    for bad in (np.zeros((4, 4, 3)), [], np.zeros((2, 4, 4, 5))):
        with pytest.raises(ValueError):
            clip_frames(bad)


def test_generator_writes_clips_the_validator_reads(tiny_video, tiny_models, tmp_path, restore_logging):
    pipeline, _ = tiny_video
    argv = [
        "--generator.models", str(tiny_models.sd), "--generator.prompt_mode", "static", "--generator.device", "cpu",
        "--generator.captioner", "none", "--generator.rewriter", "none", "--generator.torch_threads", "1",
        "--generator.resolution", "64", "--generator.steps", "1", "--generator.max_images", "1",
        "--generator.cache_dir", str(tmp_path / "images"), "--neuron.state_dir", str(tmp_path / "state"),
        "--generator.video_share", "1", "--generator.video_models", str(pipeline), "--generator.video_frames", "4",
        "--generator.video_cache_dir", str(tmp_path / "clips"), "--generator.seed", "1",
    ]
    assert generator.main(argv) == 0
    (frames, fps), label, metadata = SyntheticVideoSource(ClipCache(tmp_path / "clips")).sample(
        np.random.default_rng(0))
    assert frames.shape == (4, 64, 64, 3) and fps == 8.0 and label == 1
    assert metadata["modality"] == "video" and metadata["model"] == "pipeline" and metadata["prompt"]
    beat = json.loads((tmp_path / "state" / "heartbeat.json").read_text())
    assert (beat["images"], beat["failures"]) == (1, 0)


@pytest.mark.parametrize(("flags", "message"), [
    (["--generator.video_share", "2"], "video_share"),
    (["--generator.video_share", "0.5", "--generator.video_models", "sdxl-base"], "not text-to-video"),
    (["--generator.video_frames", "-1"], "video_frames"),
])
def test_generator_bad_video_flags_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as exited:
        generator.main(flags)
    assert exited.value.code == 2 and message in capsys.readouterr().err
