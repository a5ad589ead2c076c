"""Synthetic image generation: captioner, rewriter, moderation, diffusion pool, pipeline and the generator process.

Every model is a tiny random one built from configs and saved locally (validator/generation/tiny_models.py), then loaded back
through the production `from_pretrained` code; nothing touches the network.
"""

import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from bitmind.hub_id import is_hub_id
from bitmind.monitoring.monitor import Monitor
from neurons import generator
from tests._tiny_models import one_torch_thread, tiny_models  # noqa: F401 - fixtures
from validator.challenges.cache import ImageCache
from validator.generation.captioner import CAPTION_PREFIXES, Captioner, clean_answer
from validator.generation.diffusion import (
    DEFAULT_MODELS,
    MAX_CALL_FAILURES,
    DiffusionModelPool,
    ModelConfigError,
    NoModelAvailable,
    RandomRange,
    UnsafeImageError,
    parse_model_list,
)
from validator.generation.moderation import moderate_prompt
from validator.generation.pipeline import NoSourceImage, SyntheticImagePipeline
from validator.generation.prompt_rewriter import PromptRewriter, _load_kwargs, clean_rewrite


class StubSource:
    """A real-image source with one known image and reference."""

    def __init__(self, empty: bool = False) -> None:
        self.empty = empty

    def sample(self, rng):
        if self.empty:
            return None
        image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 40, 3), dtype=np.uint8))
        return image, 0, {"dataset": "stub/real", "row": 7, "not_json": object()}


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path




@pytest.fixture()
def restore_logging():
    """generator.main calls logging.basicConfig(force=True); put pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# ---------------------------------------------------------------- moderation and text cleaning
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A portrait of Dr. Jane Doe smiling", "A portrait of a person smiling"),
        ("a dog named Max Power on grass", "a dog on grass"),
        ("a NSFW nude figure, sexy pose", "a figure, pose"),
        ("see https://x.y/z and mail me@x.org or @handle now", "see and mail or now"),
        ("line\nbreak\x00 and   spaces", "line break and spaces"),
    ],
)
def test_moderate_prompt_strips_names_unsafe_words_and_noise(text, expected):
    assert moderate_prompt(text) == expected


def test_moderate_prompt_caps_length_on_a_word_boundary():
    out = moderate_prompt("word " * 300, max_chars=50)
    assert len(out) <= 50 and out.endswith("word")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Here is the rephrased prompt:\n\n\"A dog on a beach at dusk.\"", "A dog on a beach at dusk."),
        ("Prompt: a red car", "a red car"),
        ("  a quiet lake  ", "a quiet lake"),
    ],
)
def test_clean_rewrite_drops_preamble_and_quotes(raw, expected):
    assert clean_rewrite(raw) == expected


def test_clean_answer_takes_first_sentence_without_prefix_echo():
    assert clean_answer("The setting is  a beach. And more", "The setting is") == "a beach"
    assert clean_answer("", "An image of") == ""


# ---------------------------------------------------------------- captioner
def test_captioner_chains_prefixes(tiny_models, monkeypatch):
    """Each prefix is asked with everything said so far as the prompt; the answers are joined."""
    captioner = Captioner(str(tiny_models.blip2), device="cpu")
    answer_ids = captioner.processor.tokenizer(" a red cat", add_special_tokens=False, return_tensors="pt").input_ids
    prompts = []
    real_call = captioner.processor.__class__.__call__

    def recording_processor(self, images=None, text=None, **kwargs):
        prompts.append(text)
        return real_call(self, images=images, text=text, **kwargs)

    monkeypatch.setattr(captioner.processor.__class__, "__call__", recording_processor)
    monkeypatch.setattr(captioner.model, "generate", lambda input_ids, **_: torch.cat([input_ids, answer_ids], dim=1))
    caption = captioner.caption(Image.new("RGB", (40, 30), "red"))
    expected = " ".join(f"{prefix} a red cat." for prefix in CAPTION_PREFIXES)
    assert caption == expected
    assert prompts[0] == "An image of"
    assert prompts[1] == "An image of a red cat. The setting is"
    assert prompts[3] == expected.rsplit(" a red cat.", 1)[0]


def test_captioner_tiny_blip2_gives_a_caption(tiny_models):
    caption = Captioner(str(tiny_models.blip2), device="cpu", max_new_tokens=6).caption(Image.new("L", (33, 21)))
    assert caption.startswith("An image of ") and caption.endswith(".")


# ---------------------------------------------------------------- rewriter
def test_rewriter_on_cpu_loads_full_precision_and_says_so(tiny_models, monkeypatch, caplog):
    import transformers

    def no_bitsandbytes(*_, **__):
        raise AssertionError("BitsAndBytesConfig must not be used on CPU")

    monkeypatch.setattr(transformers, "BitsAndBytesConfig", no_bitsandbytes)
    with caplog.at_level(logging.INFO, logger="validator.generation.prompt_rewriter"):
        rewriter = PromptRewriter(str(tiny_models.llm), device="cpu", quantize_4bit=True, max_new_tokens=8)
    assert any("full precision" in r.getMessage() and "4-bit" in r.getMessage() for r in caplog.records)
    assert not rewriter.quantized_4bit
    assert next(rewriter.generator.model.parameters()).dtype == torch.float32
    assert isinstance(rewriter.rewrite("an image of a red cat on a table"), str)


def test_rewriter_on_cuda_asks_for_4bit_nf4(monkeypatch):
    """The GPU branch (no GPU here): bitsandbytes 4-bit config, or half precision with a warning without it."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    kwargs = _load_kwargs(torch.device("cuda:0"), True, "m")
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["device_map"] == {"": torch.device("cuda:0")}
    assert _load_kwargs(torch.device("cuda:0"), False, "m") == {"dtype": torch.bfloat16}
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert _load_kwargs(torch.device("cuda:0"), True, "m") == {"dtype": torch.bfloat16}


# ---------------------------------------------------------------- model lists
def test_default_model_list_is_distinct_hub_models_with_arguments():
    specs = parse_model_list("default")
    assert specs == list(DEFAULT_MODELS) and specs
    for spec in specs:
        assert is_hub_id(spec.path), f"{spec.name}: {spec.path!r} is not an org/name hub id"
    assert len({s.path for s in specs}) == len(specs) and len({s.name for s in specs}) == len(specs)
    flux = next(s for s in specs if s.name == "flux-dev")
    assert flux.pipeline == "FluxPipeline" and flux.load_kwargs["dtype"] == "bfloat16"
    rng = random.Random(0)
    draws = [flux.draw_call_args(rng) for _ in range(50)]
    assert all(d["guidance_scale"] == 2.0 and 50 <= d["num_inference_steps"] <= 125 for d in draws)
    assert len({d["num_inference_steps"] for d in draws}) > 10
    assert all(s.vram_gb and s.resolution for s in DEFAULT_MODELS)


def test_model_list_accepts_names_hub_ids_local_folders_and_yaml(tiny_models, tmp_path):
    specs = parse_model_list(f"mobius, SG161222/RealVisXL_V4.0, someone/new-model, {tiny_models.sd}")
    assert [s.name for s in specs] == ["mobius", "realvisxl-v4", "new-model", "sd"]
    assert specs[1].pipeline == "StableDiffusionXLPipeline"  # a built-in's hub id keeps its tuned arguments
    assert specs[2].pipeline == "AutoPipelineForText2Image" and specs[3].path == str(tiny_models.sd)
    yaml_path = _yaml(
        tmp_path,
        f"""
models:
  - name: flux-dev
    vram_gb: 40
  - name: local
    path: {tiny_models.sd}
    call_kwargs: {{num_inference_steps: {{min: 1, max: 3}}, guidance_scale: {{min: 1.5, max: 2.5}}}}
    resolution: [64, 32]
""",
    )
    flux, local = parse_model_list(str(yaml_path))
    built_in = next(s for s in DEFAULT_MODELS if s.name == "flux-dev")
    assert flux.vram_gb == 40 and flux.path == built_in.path and flux.pipeline == built_in.pipeline
    args = local.draw_call_args(random.Random(1))
    assert args["height"] == 64 and args["width"] == 32
    assert isinstance(args["num_inference_steps"], int) and 1 <= args["num_inference_steps"] <= 3
    assert isinstance(args["guidance_scale"], float) and 1.5 <= args["guidance_scale"] <= 2.5
    assert local.draw_call_args(random.Random(1), resolution=16, steps=1) | {"guidance_scale": 0} == {
        "num_inference_steps": 1, "guidance_scale": 0, "height": 16, "width": 16,
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/no/such/model", "no such local folder|not a built-in name"),
        ("not a model!", "not a built-in name"),
        ("", None),
        ("sdxl-base,sdxl-base", "unique"),
        ("/tmp/models-missing.yaml", "cannot read model list"),
    ],
)
def test_bad_model_lists_are_clear_errors(value, message):
    if message is None:  # empty means the defaults
        assert len(parse_model_list(value)) == len(DEFAULT_MODELS)
        return
    with pytest.raises(ModelConfigError, match=message):
        parse_model_list(value)


@pytest.mark.parametrize(
    "entry",
    [
        "{name: x, path: a/b, colour: red}",
        "{name: x, path: a/b, call_kwargs: {num_inference_steps: {min: 5, max: 1}}}",
        "{name: x, path: a/b, call_kwargs: {prompt: hi}}",
        "{name: x, path: a/b, load_kwargs: {dtype: int8}}",
        "{name: x, path: a/b, resolution: 100}",
        "{name: 'bad name', path: a/b}",
        "42",
        "{1: 2}",
        "{name: x, path: a/b, 3: 4}",
    ],
)
def test_bad_yaml_entries_are_clear_errors(tmp_path, entry):
    with pytest.raises(ModelConfigError, match="entry 0"):
        parse_model_list(str(_yaml(tmp_path, f"- {entry}\n")))


def test_yaml_must_hold_a_list(tmp_path):
    with pytest.raises(ModelConfigError, match="expected a list"):
        parse_model_list(str(_yaml(tmp_path, "models: 3\n")))
    with pytest.raises(ModelConfigError, match="cannot read"):
        parse_model_list(str(_yaml(tmp_path, "- [unclosed\n")))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("- {name: caf\u00e9, path: a/b}\n".encode("latin-1"))
    with pytest.raises(ModelConfigError, match="cannot read"):
        parse_model_list(str(latin1))


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(ModelConfigError, match="model_index.json"):
        parse_model_list(str(tmp_path))


def test_random_range_draws_ints_or_floats():
    rng = random.Random(3)
    assert all(isinstance(RandomRange(min=1, max=4).draw(rng), int) for _ in range(5))
    assert all(0.5 <= RandomRange(min=0.5, max=1).draw(rng) <= 1 for _ in range(5))


# ---------------------------------------------------------------- diffusion pool
def _two_model_yaml(tmp_path, models, vram_gb=1.0):
    return _yaml(
        tmp_path,
        f"""
- {{name: a, path: {models.sd}, vram_gb: {vram_gb}, call_kwargs: {{num_inference_steps: 1}}}}
- {{name: b, path: {models.sd_b}, vram_gb: {vram_gb}, call_kwargs: {{num_inference_steps: 1}}}}
""",
    )


@pytest.fixture()
def count_loads(monkeypatch):
    """Paths passed to AutoPipelineForText2Image.from_pretrained."""
    import diffusers

    calls = []
    original = diffusers.AutoPipelineForText2Image.from_pretrained

    def counting(path, **kwargs):
        calls.append(Path(path).name)
        return original(path, **kwargs)

    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", counting)
    return calls


def test_pool_evicts_least_recently_used_and_never_reloads_a_loaded_model(tiny_models, tmp_path, count_loads):
    specs = parse_model_list(str(_two_model_yaml(tmp_path, tiny_models)))
    pool = DiffusionModelPool(specs, device="cpu", budget_gb=1.5)  # room for one model
    rng = random.Random(0)
    first = pool.generate("a", "a red cat", rng, resolution=64)
    pool.generate("a", "a blue dog", rng, resolution=64)
    assert count_loads == ["sd"] and pool.loaded() == ["a"]
    assert first.image.size == (64, 64) and first.call_args["num_inference_steps"] == 1
    pool.get("b")
    assert count_loads == ["sd", "sd_b"] and pool.loaded() == ["b"]
    pool.get("a")
    assert count_loads == ["sd", "sd_b", "sd"] and pool.loaded() == ["a"]
    assert pool.used_gb() == pytest.approx(1.0)


def test_pool_keeps_every_model_that_fits(tiny_models, tmp_path, count_loads):
    pool = DiffusionModelPool(parse_model_list(str(_two_model_yaml(tmp_path, tiny_models))), budget_gb=2.5)
    for name in ("a", "b", "a", "b", "a"):
        pool.get(name)
    assert count_loads == ["sd", "sd_b"] and pool.loaded() == ["b", "a"]  # LRU order
    pool.close()
    assert pool.loaded() == []


def test_model_that_fails_to_load_is_skipped_and_others_generate(tiny_models, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models.sd, broken)
    shutil.rmtree(broken / "unet")
    specs = parse_model_list(f"{broken},{tiny_models.sd}")
    pool = DiffusionModelPool(specs, device="cpu", budget_gb=10)
    cache = ImageCache(tmp_path / "cache", max_bytes=10**7)
    pipeline = SyntheticImagePipeline(pool, cache, prompt_mode="static", resolution=64, steps=1, seed=5)
    with caplog.at_level(logging.WARNING, logger="validator.generation.diffusion"):
        record = pipeline.run_once(model="broken")
    assert record.metadata["model"] == "sd" and record.path.exists()
    assert list(pool.failed) == ["broken"] and pool.available() == ["sd"]
    assert any("broken failed to load" in r.getMessage() for r in caplog.records)
    assert pipeline.pick_model() == "sd"

    only_broken = DiffusionModelPool(parse_model_list(str(broken)), budget_gb=10)
    lonely = SyntheticImagePipeline(only_broken, cache, prompt_mode="static", steps=1)
    with pytest.raises(NoModelAvailable):
        lonely.run_once()


def test_model_that_fails_every_run_is_set_aside_and_others_generate(tiny_models, tmp_path, caplog):
    """It loads, but every run fails (here a clip_skip past its text encoder's depth): after MAX_CALL_FAILURES runs in
    a row it is set aside like a model that fails to load, instead of taking its share of every round."""
    models = _yaml(tmp_path, f"- {{name: good, path: {tiny_models.sd}}}\n"
                             f"- {{name: typo, path: {tiny_models.sd}, call_kwargs: {{clip_skip: 99}}}}\n")
    pool = DiffusionModelPool(parse_model_list(str(models)), device="cpu", budget_gb=10)
    pipeline = SyntheticImagePipeline(pool, ImageCache(tmp_path / "cache", max_bytes=10**7), prompt_mode="static",
                                      resolution=32, steps=1, seed=5)  # fmt: skip
    assert pipeline.run_once(model="good").metadata["model"] == "good"
    with caplog.at_level(logging.ERROR, logger="validator.generation.diffusion"):
        for _ in range(MAX_CALL_FAILURES):
            assert pool.available() == ["good", "typo"]
            with pytest.raises(IndexError):
                pipeline.run_once(model="typo")
    assert list(pool.failed) == ["typo"] and pool.available() == ["good"] and "typo" not in pool.loaded()
    assert "model typo set aside: 3 runs failed in a row" in caplog.text
    assert pipeline.run_once(model="typo").metadata["model"] == "good"


def test_pool_rejects_unknown_pipeline_class(tmp_path):
    specs = parse_model_list(str(_yaml(tmp_path, "- {name: x, path: a/b, pipeline: NoSuchPipeline}\n")))
    with pytest.raises(ModelConfigError, match="NoSuchPipeline"):
        DiffusionModelPool(specs, budget_gb=1)


def test_image_flagged_by_safety_checker_is_refused(monkeypatch):
    flagged = SimpleNamespace(images=[Image.new("RGB", (8, 8))], nsfw_content_detected=[True])
    pool = DiffusionModelPool(parse_model_list("someone/model"), budget_gb=1)
    monkeypatch.setattr(pool, "_load", lambda spec: lambda **_: flagged)
    with pytest.raises(UnsafeImageError):
        pool.generate("model", "a prompt", random.Random(0))


# ---------------------------------------------------------------- end to end
def test_caption_rewrite_generate_cache_end_to_end(tiny_models, tmp_path):
    captioner = Captioner(str(tiny_models.blip2), device="cpu", max_new_tokens=5)
    rewriter = PromptRewriter(str(tiny_models.llm), device="cpu", max_new_tokens=10)
    pool = DiffusionModelPool(parse_model_list(str(tiny_models.sd)), device="cpu", budget_gb=10)
    cache = ImageCache(tmp_path / "cache", max_bytes=10**7)
    pipeline = SyntheticImagePipeline(
        pool, cache, source=StubSource(), captioner=captioner, rewriter=rewriter, resolution=64, steps=2, seed=11
    )
    record = pipeline.run_once()

    sidecar = json.loads(record.path.with_suffix(".json").read_text())
    meta = sidecar["metadata"]
    assert sidecar["width"] == sidecar["height"] == 64 and meta == record.metadata
    assert meta["label"] == 1 and meta["model"] == "sd" and meta["model_path"] == str(tiny_models.sd)
    assert meta["caption"].startswith("An image of") and meta["prompt"]
    assert meta["prompt"] == moderate_prompt(meta["rewritten"] or meta["caption"])
    assert meta["captioner"] == str(tiny_models.blip2) and meta["rewriter"] == str(tiny_models.llm)
    assert meta["source"] == {"dataset": "stub/real", "row": 7}
    assert meta["call_args"] == {"num_inference_steps": 2, "height": 64, "width": 64}
    assert set(meta["timings"]) == {"caption_s", "rewrite_s", "load_s", "generate_s", "total_s"}

    # The recorded seed and arguments reproduce the cached pixels.
    again = pool.get("sd")(
        prompt=meta["prompt"], generator=torch.Generator("cpu").manual_seed(meta["seed"]), **meta["call_args"]
    ).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(record.path).convert("RGB")))


def test_pipeline_without_rewriter_and_its_errors(tiny_models, tmp_path):
    pool = DiffusionModelPool(parse_model_list(str(tiny_models.sd)), budget_gb=10)
    cache = ImageCache(tmp_path / "c", max_bytes=10**6)
    captioner = SimpleNamespace(model_id="stub", caption=lambda image: "An image of a cat.")
    empty = SyntheticImagePipeline(pool, cache, source=StubSource(empty=True), captioner=captioner)
    with pytest.raises(NoSourceImage):
        empty.run_once()
    with pytest.raises(ValueError, match="needs a real image source"):
        SyntheticImagePipeline(pool, cache, prompt_mode="caption")
    with pytest.raises(ValueError, match="prompt_mode"):
        SyntheticImagePipeline(pool, cache, prompt_mode="dream")
    unsafe = SyntheticImagePipeline(
        pool, cache, source=StubSource(), captioner=SimpleNamespace(model_id="s", caption=lambda image: "nude")
    )
    with pytest.raises(ValueError, match="moderation"):
        unsafe.run_once()
    assert len(cache) == 0

    no_rewriter = SyntheticImagePipeline(pool, cache, source=StubSource(), captioner=captioner, steps=1, resolution=32)
    meta = no_rewriter.run_once().metadata
    assert meta["prompt"] == meta["caption"] == "An image of a cat." and meta["rewriter"] is None
    assert len(cache) == 1


# ---------------------------------------------------------------- generator process
def _image_folder(root: Path, count: int = 3) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"real_{i}.png")
    return root


def _generator_args(models, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--generator.models", f"{models.sd},{models.sd_b}",
        "--generator.captioner", str(models.blip2),
        "--generator.rewriter", str(models.llm),
        "--generator.device", "cpu",
        "--generator.resolution", "64",
        "--generator.steps", "1",
        "--generator.cache_dir", str(tmp_path / "synthetic"),
        "--neuron.state_dir", str(tmp_path / "state"),
        *extra,
    ]


def test_generator_run_writes_images_heartbeat_and_budgets_after_the_helpers_load(
    tiny_models, tmp_path, restore_logging, monkeypatch
):
    """The whole process on tiny models: images cached, heartbeat with the counts, memory measured after loading."""
    events = []

    class RecordingCaptioner(Captioner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            events.append("captioner loaded")

    class RecordingRewriter(PromptRewriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            events.append("rewriter loaded")

    def free_host_ram(device):  # stand-in for the memory query: 5 GB of host RAM free
        events.append(f"measured {device}")
        return 5.0

    monkeypatch.setattr(generator, "Captioner", RecordingCaptioner)
    monkeypatch.setattr(generator, "PromptRewriter", RecordingRewriter)
    monkeypatch.setattr("validator.generation.memory.free_memory_gb", free_host_ram)
    real = _image_folder(tmp_path / "real")
    argv = _generator_args(
        tiny_models, tmp_path, "--generator.real_source", str(real), "--generator.max_images", "2",
        "--generator.batch", "1", "--generator.seed", "3",
    )
    assert generator.main(argv) == 0
    assert events == ["captioner loaded", "rewriter loaded", "measured cpu"]

    items = ImageCache(tmp_path / "synthetic").items()
    assert len(items) == 2
    for item in items:
        meta = json.loads(item.sidecar_path.read_text())["metadata"]
        assert meta["source"]["dataset"] == str(real) and isinstance(meta["source"]["row"], int)
        assert meta["model"] in ("sd", "sd_b") and meta["caption"].startswith("An image of")
        assert meta["rewriter"] == str(tiny_models.llm) and meta["call_args"]["num_inference_steps"] == 1
        assert Image.open(item.image_path).size == (64, 64)
    assert any((tmp_path / "state" / "real_cache").iterdir())  # the real-image cache follows --neuron.state_dir

    beat = json.loads((tmp_path / "state" / "heartbeat.json").read_text())
    assert beat["role"] == "generator" and beat["pid"] == os.getpid()
    assert (beat["state"], beat["exit_code"], beat["images"], beat["failures"]) == ("stopped", 0, 2, 0)
    assert beat["cache_items"] == 2 and beat["cache_mb"] > 0 and beat["model"] in ("sd", "sd_b")
    assert beat["memory_budget_gb"] == pytest.approx(4.0)  # 80 % of the 5 GB measured after loading
    assert beat["helpers_swapped"] is False  # on CPU moving to host RAM would be a no-op


def test_generator_parser_takes_the_start_script_flags(tmp_path):
    """The exact flags scripts/start_generator.sh passes, through the real parser."""
    argv = ["--generator.device", "cpu", "--neuron.metrics_port", "0", "--neuron.state_dir", str(tmp_path / "s"),
            "--neuron.heartbeat_file", str(tmp_path / "hb.json"), "--neuron.watchdog_timeout", "120",
            "--neuron.metrics_host", "127.0.0.1", "--wandb.project", "p"]
    config = generator.build_config(generator.build_parser(), argv)
    assert config.generator.device == "cpu" and config.wandb.project == "p"
    n = config.neuron
    assert (n.metrics_port, n.metrics_host, n.watchdog_timeout) == (0, "127.0.0.1", 120.0)
    assert (n.state_dir, n.heartbeat_file) == (str(tmp_path / "s"), str(tmp_path / "hb.json"))
    defaults = generator.build_config(generator.build_parser(), []).neuron
    assert defaults.watchdog_timeout == generator.WATCHDOG_TIMEOUT_S and defaults.heartbeat_file == ""
    assert defaults.state_dir.endswith("generator")


def test_generator_flags_reach_the_code(tiny_models, tmp_path):
    argv = _generator_args(tiny_models, tmp_path, "--generator.batch", "7", "--generator.vram_budget_gb", "4")
    config = generator.build_config(generator.build_parser(), argv)
    g = config.generator
    assert (g.batch, g.resolution, g.steps, g.vram_budget_gb) == (7, 64, 1, 4.0)
    assert g.rewriter == str(tiny_models.llm) and g.prompt_mode == "caption" and g.max_images == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--generator.models", "/no/such/model/dir"], "/no/such/model/dir"),
        (["--generator.models", "sdxl-base,bogus"], "bogus"),
        (["--generator.resolution", "63"], "resolution"),
        (["--generator.batch", "0"], "batch"),
        (["--generator.captioner", "/no/such/blip"], "captioner"),
        (["--generator.device", "gpu0"], "device"),
        (["--generator.device", "cuda:0"], "no CUDA device is available"),
        (["--generator.prompt_mode", "dream"], "prompt_mode"),
        (["--generator.real_source", "/no/such/parquet.parquet"], "real_source"),
        (["--generator.real_source", "owner/data?colour=red"], "unknown dataset option"),
        (["--generator.real_source", ","], "real_source"),
        (["--neuron.watchdog_timeout", "-1"], "watchdog_timeout"),
        (["--neuron.metrics_port", "70000"], "metrics_port"),
        (["--neuron.device", "cpu"], "unrecognized"),  # the generator's device flag is --generator.device
        (["--generator.bogus", "1"], "unrecognized"),
    ],
)
def test_generator_bad_flags_exit_2_with_a_clear_message(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        generator.main(flags)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_generator_exits_1_when_the_captioner_cannot_load(tmp_path, restore_logging):
    bad = tmp_path / "not_blip"
    bad.mkdir()
    argv = ["--generator.captioner", str(bad), "--generator.device", "cpu",
            "--generator.cache_dir", str(tmp_path / "c"), "--neuron.state_dir", str(tmp_path / "s")]
    assert generator.main(argv) == 1


class _StubCache:
    def __len__(self) -> int:
        return 1

    def total_bytes(self) -> int:
        return 10


class _ScriptedPipeline:
    """Stands in for SyntheticImagePipeline in loop tests: each render raises or succeeds as scripted."""

    cache = _StubCache()

    def __init__(self, outcomes):
        self.outcomes = iter(outcomes)

    def pick_task(self):
        return "text-to-image"

    def pick_model(self, task):
        return "m"

    def make_prompt(self):
        return "a prompt"

    def render(self, prompt, model):
        outcome = next(self.outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        metadata = {"kind": "synthetic", "model": model, "call_args": {}, "timings": {"total_s": 0.1}}
        return SimpleNamespace(metadata=metadata, path=Path("x"))


class _Resident:
    def for_prompts(self):
        pass

    def for_images(self):
        pass


def _progress(tmp_path, max_failures):
    config = {"neuron": {"heartbeat_file": str(tmp_path / "hb.json"), "watchdog_timeout": 0, "metrics_port": 0}}
    monitor = Monitor.from_config(config, role="generator")
    return generator.Progress(monitor, _StubCache(), max_failures)


def test_loop_logs_a_failed_image_continues_and_reports_counts(caplog, tmp_path):
    g = SimpleNamespace(batch=5, max_images=2, max_failures=3, interval=0.0)
    progress = _progress(tmp_path, 3)
    with caplog.at_level(logging.INFO, logger="neurons.generator"):
        code = generator._loop(_ScriptedPipeline([RuntimeError("boom"), "ok", "ok"]), _Resident(), g,
                               threading.Event(), progress)
    assert code == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("image failed (1 in a row): RuntimeError: boom" in m for m in messages)
    assert sum(m.startswith("image ") and "model=m" in m for m in messages) == 2
    beat = json.loads((tmp_path / "hb.json").read_text())
    assert (beat["images"], beat["failures"], beat["failures_in_a_row"]) == (2, 1, 0)
    assert beat["last_error"] == "RuntimeError: boom" and beat["cache_items"] == 1
    registry = progress.monitor.metrics.registry
    assert registry.get_sample_value("bitmind_generated_images_total", {"model": "m"}) == 2
    assert registry.get_sample_value("bitmind_errors_total", {"kind": "image"}) == 1
    assert registry.get_sample_value("bitmind_synthetic_cache_items") == 1


def test_loop_gives_up_after_max_failures_in_a_row(tmp_path):
    g = SimpleNamespace(batch=10, max_images=0, max_failures=3, interval=0.0)
    progress = _progress(tmp_path, 3)
    assert generator._loop(_ScriptedPipeline([ValueError("x")] * 3), _Resident(), g, threading.Event(), progress) == 1
    assert json.loads((tmp_path / "hb.json").read_text())["failures_in_a_row"] == 3


def test_loop_stops_when_asked(tmp_path):
    stop = threading.Event()
    stop.set()
    g = SimpleNamespace(batch=1, max_images=0, max_failures=1, interval=0.0)
    assert generator._loop(_ScriptedPipeline([]), _Resident(), g, stop, _progress(tmp_path, 1)) == 0


def test_waits_between_rounds_keep_the_watchdog_fed(tmp_path):
    """A planned wait longer than the watchdog timeout is not a hang: the wait beats while it lasts."""
    fired = []
    config = {"neuron": {"heartbeat_file": str(tmp_path / "hb.json"), "watchdog_timeout": 0.3}}
    monitor = Monitor.from_config(config, role="generator", on_watchdog_expire=fired.append)
    progress = generator.Progress(monitor, _StubCache(), 1)
    try:
        generator._wait(threading.Event(), 1.0, progress, "idle")
    finally:
        monitor.close()
    assert fired == [] and json.loads((tmp_path / "hb.json").read_text())["state"] == "idle"


_STALL_AT_FIRST_IMAGE = """
import sys, threading
from validator.generation import diffusion
from neurons import generator

def hung_gpu_call(self, *args, **kwargs):
    threading.Event().wait()

diffusion.DiffusionModelPool.generate = hung_gpu_call
sys.exit(generator.main(sys.argv[1:]))
"""


def test_generator_watchdog_exits_75_when_an_image_hangs(tiny_models, tmp_path):
    """The real process with its real watchdog: a diffusion call that never returns ends it with code 75."""
    import subprocess
    import sys

    from bitmind.monitoring.watchdog import WATCHDOG_EXIT_CODE

    argv = [
        "--generator.models", str(tiny_models.sd), "--generator.prompt_mode", "static", "--generator.device", "cpu",
        "--generator.cache_dir", str(tmp_path / "syn"), "--generator.torch_threads", "1",
        "--neuron.state_dir", str(tmp_path / "state"), "--neuron.watchdog_timeout", "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _STALL_AT_FIRST_IMAGE, *argv], capture_output=True, text=True,
                          timeout=300, env=env, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == WATCHDOG_EXIT_CODE, done.stdout[-2000:] + done.stderr[-2000:]
    assert "watchdog: no progress" in done.stdout + done.stderr
    beat = json.loads((tmp_path / "state" / "heartbeat.json").read_text())
    assert (beat["state"], beat["images"], beat["failures"]) == ("prompts", 0, 0)


def test_generator_stops_cleanly_on_sigterm(tiny_models, tmp_path, restore_logging):
    """A real SIGTERM to this process, sent once the first image is cached, ends main() with code 0."""
    cache_dir = tmp_path / "syn"
    argv = [
        "--generator.models", str(tiny_models.sd), "--generator.prompt_mode", "static", "--generator.device", "cpu",
        "--generator.resolution", "64", "--generator.steps", "1", "--generator.cache_dir", str(cache_dir),
        "--generator.vram_budget_gb", "4", "--generator.batch", "1", "--neuron.state_dir", str(tmp_path / "state"),
        "--neuron.watchdog_timeout", "0",
    ]
    done = threading.Event()

    def terminate_after_first_image():
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline and not list(cache_dir.glob("*.json")):
            time.sleep(0.05)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=terminate_after_first_image, daemon=True)
    killer.start()
    try:
        code = generator.main(argv)
    finally:
        done.set()
        killer.join(5)
    assert code == 0
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert len(ImageCache(cache_dir).items()) >= 1
    assert json.loads((tmp_path / "state" / "heartbeat.json").read_text())["state"] == "stopped"
