"""Text-to-image and inpainting models: the default lists with per-model arguments, and a pool that keeps them loaded.

Loading a diffusion model takes tens of seconds, so a model is loaded ONCE and kept while it fits in a memory
budget (decided by `memory.plan_memory`); when a new one does not fit, the least recently used ones are dropped.
Under a swap plan `park()` moves the loaded pipelines to host RAM while the captioner and rewriter use the GPU, and
`get()` brings one back. A model that fails to load is skipped from then on and the others keep generating.

A model list is a comma-separated string of built-in names, hub ids (owner/name) and local pipeline folders, or a
YAML file with a list of entries (a string like the above, or a mapping of `ModelSpec` fields; a mapping whose
`name` is a built-in one and which gives no `path` overrides fields of that built-in entry). Inpainting models
(`task: inpainting`, default list `DEFAULT_INPAINT_MODELS`) share the pool, its budget and its LRU with the
text-to-image ones; `inpaint()` regenerates the masked region of a real image. So do text-to-video models
(`task: text-to-video`, default list `DEFAULT_VIDEO_MODELS`: Mochi 1, CogVideoX-5b, AnimateDiff-Lightning);
`generate_video()` returns a clip's frames and frame rate. For example:

    - sdxl-base
    - name: flux-dev
      vram_gb: 40
    - name: my-model
      path: /models/my-sd15
      pipeline: StableDiffusionPipeline
      call_kwargs: {num_inference_steps: {min: 20, max: 40}, guidance_scale: 7.5}
      resolution: 512
"""

import gc
import logging
import random
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bitmind.hub_id import is_hub_id
from validator.generation.inpainting import composite, mask_area, work_size
from validator.generation.memory import modules_gb

__all__ = [
    "DEFAULT_INPAINT_MODELS",
    "DEFAULT_MODELS",
    "DEFAULT_VIDEO_MODELS",
    "TEXT_TO_VIDEO",
    "GeneratedClip",
    "INPAINTING",
    "TASKS",
    "TEXT_TO_IMAGE",
    "DiffusionModelPool",
    "GeneratedImage",
    "ModelConfigError",
    "ModelLoadError",
    "ModelSpec",
    "NoModelAvailable",
    "RandomRange",
    "UnsafeImageError",
    "check_pipeline_classes",
    "parse_model_list",
]

log = logging.getLogger(__name__)

_DTYPES = ("float16", "bfloat16", "float32")
# Arguments the pool sets itself; a model entry may not override them.
_RESERVED_CALL_KWARGS = frozenset(
    {"prompt", "generator", "height", "width", "output_type", "return_dict", "image", "mask_image"}
)
TEXT_TO_IMAGE, INPAINTING, TEXT_TO_VIDEO = "text-to-image", "inpainting", "text-to-video"
TASKS = (TEXT_TO_IMAGE, INPAINTING, TEXT_TO_VIDEO)
# diffusers has no auto class for text-to-video: DiffusionPipeline reads the class from the folder's model_index.json.
_DEFAULT_PIPELINE = {
    TEXT_TO_IMAGE: "AutoPipelineForText2Image", INPAINTING: "AutoPipelineForInpainting", TEXT_TO_VIDEO: "DiffusionPipeline"
}
DEFAULT_CLIP_FPS = 8.0  # frame rate of a text-to-video model's clips when its entry names none
# Working side of an inpainting model that names no resolution (the SD 1.x native size).
DEFAULT_INPAINT_SIDE = 512


class ModelConfigError(ValueError):
    """A model list or model entry that cannot be used (unknown name, missing folder, bad field)."""


MAX_CALL_FAILURES = 3  # failed runs in a row after which a model is set aside


class ModelLoadError(RuntimeError):
    """`from_pretrained` failed; the pool skips this model from now on."""


class NoModelAvailable(RuntimeError):
    """Every configured model failed to load."""


class UnsafeImageError(RuntimeError):
    """The pipeline's own safety checker flagged the image (it comes back black); it is not cached."""


class RandomRange(BaseModel):
    """A call argument drawn per image: an int in [min, max] when both bounds are ints, else a float."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min: int | float
    max: int | float

    @model_validator(mode="after")
    def _ordered(self) -> "RandomRange":
        if self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def draw(self, rng: random.Random) -> int | float:
        if isinstance(self.min, int) and isinstance(self.max, int):
            return rng.randint(self.min, self.max)
        return round(rng.uniform(self.min, self.max), 3)


class ModelSpec(BaseModel):
    """One text-to-image or inpainting model: where it lives, how to load it and how to call it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(TEXT_TO_IMAGE, pattern=f"^({'|'.join(TASKS)})$", description="What the model does.")

    name: str = Field(pattern=r"^[\w.\-]+$", description="Short name used in logs and image metadata.")
    path: str = Field(min_length=1, description="Hub id (owner/name) or local folder saved with save_pretrained.")
    pipeline: str = Field(
        "AutoPipelineForText2Image",
        pattern=r"^(AutoPipeline\w*|\w+Pipeline)$",
        description="diffusers class whose from_pretrained loads the model.",
    )
    load_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="from_pretrained arguments; `dtype` is used on GPU only (CPU always loads float32).",
    )
    call_kwargs: dict[str, RandomRange | Any] = Field(
        default_factory=dict, description="Pipeline call arguments; {min, max} mappings are drawn per image."
    )
    resolution: int | tuple[int, int] | None = Field(None, description="Side, or (height, width), of the output.")
    scheduler: str | None = Field(None, pattern=r"^\w+Scheduler$", description="diffusers scheduler class to use.")
    vram_gb: float | None = Field(None, gt=0, description="Approximate memory needed, weights plus activations.")
    scheduler_kwargs: dict[str, Any] = Field(default_factory=dict, description="Config overrides of `scheduler`.")
    fps: float | None = Field(None, gt=0, le=120, description="Frame rate of a text-to-video model's clips.")
    motion_adapter: str | None = Field(
        None, min_length=1, description="AnimateDiff motion adapter: hub id or local folder, loaded beside `path`."
    )
    motion_adapter_file: str | None = Field(
        None, pattern=r"^[\w.\-]+\.safetensors$", description="One weights file in `motion_adapter` (no config)."
    )

    @model_validator(mode="before")
    @classmethod
    def _pipeline_for_task(cls, value: Any) -> Any:
        """An entry that names only its task gets that task's auto pipeline."""
        if isinstance(value, dict) and "pipeline" not in value and value.get("task") in _DEFAULT_PIPELINE:
            return {**value, "pipeline": _DEFAULT_PIPELINE[value["task"]]}
        return value

    @field_validator("load_kwargs")
    @classmethod
    def _known_dtype(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in ("dtype", "torch_dtype"):
            if key in value and value[key] not in _DTYPES:
                raise ValueError(f"{key} must be one of {_DTYPES}, got {value[key]!r}")
        return value

    @field_validator("call_kwargs", mode="before")
    @classmethod
    def _ranges(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        reserved = _RESERVED_CALL_KWARGS.intersection(value)
        if reserved:
            raise ValueError(f"call_kwargs may not set {sorted(reserved)} (use `resolution` for the size)")
        return {
            key: RandomRange(**item) if isinstance(item, dict) and set(item) == {"min", "max"} else item
            for key, item in value.items()
        }

    @field_validator("resolution")
    @classmethod
    def _valid_resolution(cls, value: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        sides = () if value is None else (value,) if isinstance(value, int) else value
        for side in sides:
            if side < 8 or side > 4096 or side % 8:
                raise ValueError(f"resolution sides must be multiples of 8 in [8, 4096], got {value}")
        return value

    def draw_call_args(
        self, rng: random.Random, resolution: int | None = None, steps: int | None = None
    ) -> dict[str, Any]:
        """The concrete call arguments for one image: ranges drawn; `resolution` / `steps` override the entry's."""
        args = {k: v.draw(rng) if isinstance(v, RandomRange) else v for k, v in self.call_kwargs.items()}
        if steps is not None:
            args["num_inference_steps"] = steps
        size = resolution or self.resolution
        if size is not None:
            args["height"], args["width"] = (size, size) if isinstance(size, int) else size
        return args


_SDXL_FP16 = {"dtype": "float16", "variant": "fp16", "use_safetensors": True}

DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="sdxl-base",
        path="stabilityai/stable-diffusion-xl-base-1.0",
        pipeline="StableDiffusionXLPipeline",
        load_kwargs=_SDXL_FP16,
        call_kwargs={"num_inference_steps": {"min": 30, "max": 50}, "guidance_scale": {"min": 5.0, "max": 8.0}},
        resolution=1024,
        vram_gb=10,
    ),
    ModelSpec(
        name="realvisxl-v4",
        path="SG161222/RealVisXL_V4.0",
        pipeline="StableDiffusionXLPipeline",
        load_kwargs=_SDXL_FP16,
        call_kwargs={"num_inference_steps": {"min": 25, "max": 40}, "guidance_scale": {"min": 4.0, "max": 7.0}},
        resolution=1024,
        vram_gb=10,
    ),
    ModelSpec(
        # The model card recommends CFG 3.5-7, CLIP skip 3 and a KDPM2 ancestral sampler.
        name="mobius",
        path="Corcelio/mobius",
        pipeline="StableDiffusionXLPipeline",
        load_kwargs={"dtype": "float16", "use_safetensors": True},
        call_kwargs={"num_inference_steps": 50, "guidance_scale": {"min": 3.5, "max": 7.0}, "clip_skip": 3},
        scheduler="KDPM2AncestralDiscreteScheduler",
        resolution=1024,
        vram_gb=10,
    ),
    ModelSpec(
        # Gated on the hub: accept the licence and set HF_TOKEN before using it.
        name="flux-dev",
        path="black-forest-labs/FLUX.1-dev",
        pipeline="FluxPipeline",
        load_kwargs={"dtype": "bfloat16"},
        call_kwargs={"num_inference_steps": {"min": 50, "max": 125}, "guidance_scale": 2.0, "max_sequence_length": 512},
        resolution=1024,
        vram_gb=36,
    ),
    ModelSpec(
        name="openjourney-v4",
        path="prompthero/openjourney-v4",
        pipeline="StableDiffusionPipeline",
        load_kwargs={"dtype": "float16", "use_safetensors": True},
        call_kwargs={"num_inference_steps": {"min": 30, "max": 50}, "guidance_scale": {"min": 6.0, "max": 9.0}},
        resolution=512,
        vram_gb=4,
    ),
    ModelSpec(
        name="animagine-xl-3.1",
        path="cagliostrolab/animagine-xl-3.1",
        pipeline="StableDiffusionXLPipeline",
        load_kwargs={"dtype": "float16", "use_safetensors": True},
        call_kwargs={"num_inference_steps": 28, "guidance_scale": 7.0},
        resolution=1024,
        vram_gb=10,
    ),
)
# Inpainting models of semi-synthetic challenges (the reference subnet's pair), arguments from their model cards.
DEFAULT_INPAINT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        task=INPAINTING,
        name="sdxl-inpaint",
        path="diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        pipeline="AutoPipelineForInpainting",
        load_kwargs={"dtype": "float16", "variant": "fp16", "use_safetensors": True},
        # strength just under 1: the card notes that 1.0 can leave the region's latents unused.
        call_kwargs={"num_inference_steps": {"min": 20, "max": 30}, "guidance_scale": {"min": 6.0, "max": 8.0},
                     "strength": 0.99},
        resolution=1024,
        vram_gb=10,
    ),
    ModelSpec(
        task=INPAINTING,
        name="dreamshaper-8-inpaint",
        path="Lykon/dreamshaper-8-inpainting",
        pipeline="AutoPipelineForInpainting",
        load_kwargs={"dtype": "float16", "variant": "fp16", "use_safetensors": True},
        call_kwargs={"num_inference_steps": {"min": 20, "max": 30}, "guidance_scale": {"min": 5.0, "max": 8.0}},
        scheduler="DEISMultistepScheduler",
        resolution=512,
        vram_gb=4,
    ),
)
# Text-to-video models of video challenges (the founding notes' list), arguments from their model cards. Frame counts
# cover the validator's 2 s clip window at each model's own rate.
DEFAULT_VIDEO_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        task=TEXT_TO_VIDEO,
        name="mochi-1",
        path="genmo/mochi-1-preview",
        pipeline="MochiPipeline",
        load_kwargs={"dtype": "bfloat16", "variant": "bf16"},
        call_kwargs={"num_frames": 61, "num_inference_steps": 64, "guidance_scale": 4.5},
        resolution=(480, 848),
        fps=30.0,
        vram_gb=42,
    ),
    ModelSpec(
        task=TEXT_TO_VIDEO,
        name="cogvideox-5b",
        path="THUDM/CogVideoX-5b",
        pipeline="CogVideoXPipeline",
        load_kwargs={"dtype": "bfloat16"},
        call_kwargs={"num_frames": 49, "num_inference_steps": 50, "guidance_scale": 6.0, "use_dynamic_cfg": True},
        resolution=(480, 720),
        fps=8.0,
        vram_gb=26,
    ),
    ModelSpec(
        # The distilled 4-step motion module on a photorealistic SD 1.5 base, as its model card runs it.
        task=TEXT_TO_VIDEO,
        name="animatediff-lightning",
        path="emilianJR/epiCRealism",
        pipeline="AnimateDiffPipeline",
        load_kwargs={"dtype": "float16"},
        motion_adapter="ByteDance/AnimateDiff-Lightning",
        motion_adapter_file="animatediff_lightning_4step_diffusers.safetensors",
        scheduler="EulerDiscreteScheduler",
        scheduler_kwargs={"timestep_spacing": "trailing", "beta_schedule": "linear"},
        call_kwargs={"num_frames": 16, "num_inference_steps": 4, "guidance_scale": 1.0},
        resolution=512,
        fps=8.0,
        vram_gb=8,
    ),
)
_DEFAULTS = {TEXT_TO_IMAGE: DEFAULT_MODELS, INPAINTING: DEFAULT_INPAINT_MODELS, TEXT_TO_VIDEO: DEFAULT_VIDEO_MODELS}
_DEFAULT_BY_NAME = {spec.name: spec for spec in (*DEFAULT_MODELS, *DEFAULT_INPAINT_MODELS, *DEFAULT_VIDEO_MODELS)}
_DEFAULT_BY_PATH = {spec.path: spec for spec in (*DEFAULT_MODELS, *DEFAULT_INPAINT_MODELS, *DEFAULT_VIDEO_MODELS)}


def _spec_for_token(token: str, task: str = TEXT_TO_IMAGE) -> ModelSpec:
    """A built-in name, a built-in's hub id (keeps its tuned arguments), a local pipeline folder or a hub id; the
    last two get `task`'s auto pipeline."""
    if token in _DEFAULT_BY_NAME:
        return _DEFAULT_BY_NAME[token]
    if token in _DEFAULT_BY_PATH:
        return _DEFAULT_BY_PATH[token]
    folder = Path(token).expanduser()
    if folder.exists():
        if not (folder / "model_index.json").is_file():
            raise ModelConfigError(f"model {token!r}: the folder has no model_index.json (not a diffusers pipeline)")
        return ModelSpec(task=task, name=_safe_name(folder.name), path=str(folder.resolve()))
    if token.startswith(("/", ".", "~")):
        raise ModelConfigError(f"model {token!r}: no such local folder")
    if not is_hub_id(token):
        raise ModelConfigError(
            f"model {token!r} is not a built-in name ({', '.join(_DEFAULT_BY_NAME)}), "
            "an existing local pipeline folder, or a hub id (owner/name)"
        )
    return ModelSpec(task=task, name=_safe_name(token.split("/")[-1]), path=token)


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.\-]", "_", text) or "model"


def _spec_for_entry(entry: Any, where: str, task: str = TEXT_TO_IMAGE) -> ModelSpec:
    if isinstance(entry, str):
        return _spec_for_token(entry.strip(), task)
    if not isinstance(entry, dict):
        raise ModelConfigError(f"{where}: expected a string or a mapping, got {type(entry).__name__}")
    if not all(isinstance(key, str) for key in entry):
        raise ModelConfigError(f"{where}: every key of a model entry is a setting name, got {sorted(map(repr, entry))}")
    name = entry.get("name")
    base = _DEFAULT_BY_NAME.get(name) if isinstance(name, str) and "path" not in entry else None
    fields = {**base.model_dump(exclude_none=True), **entry} if base else {"task": task, **entry}
    try:
        return ModelSpec(**fields)
    except ValidationError as err:
        raise ModelConfigError(f"{where}: {err}") from err


def parse_model_list(value: str | Path, task: str = TEXT_TO_IMAGE) -> list[ModelSpec]:
    """Model specs for `task` from a comma list (names, hub ids, folders), a YAML file path, or `default`.

    Local folders and hub ids get the task's auto pipeline; a built-in model of the other task is an error.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    text = str(value).strip()
    if text in ("", "default"):
        return list(_DEFAULTS[task])
    if text.endswith((".yaml", ".yml")):
        path = Path(text).expanduser()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ModelConfigError(f"cannot read model list {path}: {err}") from err
        entries = data.get("models") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise ModelConfigError(f"{path}: expected a list of models (or a mapping with a `models` list)")
        specs = [_spec_for_entry(entry, f"{path} entry {i}", task) for i, entry in enumerate(entries)]
    else:
        specs = [_spec_for_token(token.strip(), task) for token in text.split(",") if token.strip()]
    if not specs:
        raise ModelConfigError(f"model list {text!r} names no model")
    wrong = [spec.name for spec in specs if spec.task != task]
    if wrong:
        raise ModelConfigError(f"models {wrong} are not {task} models")
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ModelConfigError(f"model names must be unique; repeated: {duplicates} (give entries a `name`)")
    return specs


def check_pipeline_classes(specs: list[ModelSpec]) -> None:
    """Raise ModelConfigError when a spec names a diffusers pipeline or scheduler class that does not exist."""
    import diffusers

    for spec in specs:
        for attr in (spec.pipeline, spec.scheduler):
            if attr is not None and not hasattr(diffusers, attr):
                raise ModelConfigError(f"model {spec.name}: diffusers has no class {attr}")


def _weights_gb(pipe: Any) -> float:
    import torch

    return modules_gb(m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module))


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image with everything needed to reproduce it."""

    image: Image.Image
    model: ModelSpec
    call_args: dict[str, Any]
    seed: int
    load_s: float
    generate_s: float


@dataclass(frozen=True)
class GeneratedClip:
    """One generated clip, (T, H, W, 3) uint8 frames at `fps`, with everything needed to reproduce it."""

    frames: np.ndarray
    fps: float
    model: ModelSpec
    call_args: dict[str, Any]
    seed: int
    load_s: float
    generate_s: float


@dataclass
class _Loaded:
    pipe: Any
    gb: float
    on_device: bool = True


class DiffusionModelPool:
    """Keeps pipelines loaded while they fit in `budget_gb`, dropping the least recently used ones first."""

    def __init__(
        self,
        specs: list[ModelSpec],
        budget_gb: float,
        device: str = "cpu",
        cpu_offload: bool = False,
    ) -> None:
        import torch

        if not specs:
            raise ModelConfigError("no models configured")
        if not budget_gb >= 0:
            raise ValueError(f"budget_gb must be >= 0, got {budget_gb}")
        check_pipeline_classes(specs)
        self.specs = {spec.name: spec for spec in specs}
        self.device = torch.device(device)
        self.cpu_offload = cpu_offload and self.device.type == "cuda"
        if cpu_offload and not self.cpu_offload:
            log.info("cpu offload only applies to CUDA devices; ignored on %s", self.device)
        self.budget_gb = float(budget_gb)
        self.failed: dict[str, str] = {}
        self._call_failures: dict[str, int] = {}  # failed runs in a row, per model
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        log.info(
            "diffusion pool: %d models (%s) on %s, budget %.1f GB%s",
            len(specs), ", ".join(self.specs), self.device, self.budget_gb, ", cpu offload" if self.cpu_offload else "",
        )

    def available(self, task: str | None = None) -> list[str]:
        """Models (of `task`, or of any task) that have not failed to load, nor to run MAX_CALL_FAILURES times in a
        row."""
        return [
            name for name, spec in self.specs.items()
            if name not in self.failed and (task is None or spec.task == task)
        ]

    def loaded(self) -> list[str]:
        """Loaded models, least recently used first."""
        return list(self._loaded)

    def parked(self) -> list[str]:
        """Loaded models currently moved to host RAM by `park()`."""
        return [name for name, entry in self._loaded.items() if not entry.on_device]

    def used_gb(self) -> float:
        return sum(entry.gb for entry in self._loaded.values())

    def park(self) -> None:
        """Move the loaded pipelines to host RAM (swap plan: the captioner and rewriter are about to use the GPU).

        With CPU offload the offload hooks already return every component to host RAM after each call.
        """
        if self.cpu_offload:
            return
        moved = [name for name, entry in self._loaded.items() if entry.on_device]
        if not moved:
            return
        start = time.perf_counter()
        for name in moved:
            self._loaded[name].pipe.to("cpu")
            self._loaded[name].on_device = False
        self._free_cache()
        log.info("parked models %s (%.2f GB) in host RAM in %.1f s", ", ".join(moved),
                 sum(self._loaded[name].gb for name in moved), time.perf_counter() - start)

    def get(self, name: str) -> Any:
        """The loaded pipeline for `name` (back on the device if parked), loading it and evicting LRU models when
        needed."""
        entry = self._loaded.get(name)
        if entry is not None:
            self._loaded.move_to_end(name)
            if not entry.on_device:
                start = time.perf_counter()
                entry.pipe.to(self.device)
                entry.on_device = True
                log.info("moved model %s (%.2f GB) back to %s in %.1f s", name, entry.gb, self.device,
                         time.perf_counter() - start)
            return entry.pipe
        if name not in self.specs:
            raise ModelConfigError(f"unknown model {name!r}; configured: {', '.join(self.specs)}")
        if name in self.failed:
            raise ModelLoadError(f"model {name} is set aside: {self.failed[name]}")
        spec = self.specs[name]
        self._evict_for(spec.vram_gb or 0.0)
        start = time.perf_counter()
        try:
            pipe = self._load_making_room(spec)
        except Exception as err:  # noqa: BLE001 - any loading failure disables this model only
            self.failed[name] = f"{type(err).__name__}: {err}"
            log.warning("model %s failed to load from %s (%s); skipping it from now on",
                        name, spec.path, self.failed[name])
            raise ModelLoadError(f"model {name} failed to load: {self.failed[name]}") from err
        gb = max(spec.vram_gb or 0.0, _weights_gb(pipe))
        self._loaded[name] = _Loaded(pipe, gb)
        if gb > self.budget_gb:
            log.warning("model %s needs ~%.1f GB, more than the %.1f GB budget; keeping it alone",
                        name, gb, self.budget_gb)
        self._evict_for(0.0, keep=name)
        log.info(
            "loaded model %s from %s in %.1f s (~%.2f GB; loaded: %s; %.2f/%.1f GB)",
            name, spec.path, time.perf_counter() - start, gb, ", ".join(self._loaded), self.used_gb(), self.budget_gb,
        )
        return pipe

    def generate(
        self, name: str, prompt: str, rng: random.Random, resolution: int | None = None, steps: int | None = None
    ) -> GeneratedImage:
        """Generate one image with text-to-image model `name`; the seed and drawn arguments come back for the
        metadata."""
        spec = self._spec_of(name, TEXT_TO_IMAGE)
        return self._call(spec, prompt, rng, spec.draw_call_args(rng, resolution, steps))

    def generate_video(
        self, name: str, prompt: str, rng: random.Random, resolution: int | None = None, steps: int | None = None,
        frames: int | None = None,
    ) -> GeneratedClip:
        """Generate one clip with text-to-video model `name` (`frames` overrides its frame count)."""
        spec = self._spec_of(name, TEXT_TO_VIDEO)
        call_args = spec.draw_call_args(rng, resolution, steps)
        if frames:
            call_args["num_frames"] = frames
        return self._call(spec, prompt, rng, call_args)

    def inpaint(
        self,
        name: str,
        prompt: str,
        image: Image.Image,
        mask: np.ndarray,
        rng: random.Random,
        resolution: int | None = None,
        steps: int | None = None,
    ) -> GeneratedImage:
        """Regenerate the region `mask` ([H, W] in [0, 1], feathered) marks in `image` from `prompt` with inpainting
        model `name`. The model runs at its working size (see `inpainting.work_size`, whatever the image's size);
        the returned image has `image`'s size, real outside the region. EmptyMaskError for a mask with no region."""
        spec = self._spec_of(name, INPAINTING)
        mask_area(mask)  # refuses an empty region before any model work
        side = resolution or spec.resolution or DEFAULT_INPAINT_SIDE
        width, height = work_size(image.size, side if isinstance(side, int) else max(side))
        call_args = spec.draw_call_args(rng, None, steps)
        call_args["height"], call_args["width"] = height, width
        inputs = {
            "image": image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS),
            "mask_image": Image.fromarray(np.rint(np.asarray(mask) * 255).astype(np.uint8), mode="L").resize(
                (width, height), Image.Resampling.BILINEAR
            ),
        }
        made = self._call(spec, prompt, rng, call_args, inputs)
        return replace(made, image=composite(image, made.image, mask))

    def _spec_of(self, name: str, task: str) -> ModelSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise ModelConfigError(f"unknown model {name!r}; configured: {', '.join(self.specs)}")
        if spec.task != task:
            raise ModelConfigError(f"model {name} is a {spec.task} model, not {task}")
        return spec

    def _call(
        self, spec: ModelSpec, prompt: str, rng: random.Random, call_args: dict[str, Any],
        inputs: dict[str, Any] | None = None,
    ) -> GeneratedImage | GeneratedClip:
        """Run `spec`'s pipeline once with a drawn seed; OOM drops the other models, a flagged image raises."""
        import torch

        start = time.perf_counter()
        pipe = self.get(spec.name)
        load_s = time.perf_counter() - start
        seed = rng.randrange(2**32)
        start = time.perf_counter()
        try:
            output = pipe(
                prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **(inputs or {}), **call_args
            )
        except torch.cuda.OutOfMemoryError:
            self._evict_all(keep=spec.name, why="after running out of memory")
            raise
        except Exception as err:
            self._count_call_failure(spec.name, err)
            raise
        self._call_failures.pop(spec.name, None)
        flagged = getattr(output, "nsfw_content_detected", None)
        if flagged and any(flagged):
            raise UnsafeImageError(f"model {spec.name}: the safety checker flagged the image")
        if spec.task == TEXT_TO_VIDEO:
            from validator.generation.video import clip_frames

            frames = clip_frames(output.frames[0])
            return GeneratedClip(frames, spec.fps or DEFAULT_CLIP_FPS, spec, call_args, seed, load_s,
                                 time.perf_counter() - start)
        return GeneratedImage(output.images[0], spec, call_args, seed, load_s, time.perf_counter() - start)

    def _count_call_failure(self, name: str, err: Exception) -> None:
        """A model that loads but fails every run (a call argument it does not take, a broken pipeline) is set
        aside like one that fails to load, instead of taking its share of every round until the generator exits."""
        failures = self._call_failures.get(name, 0) + 1
        self._call_failures[name] = failures
        if failures >= MAX_CALL_FAILURES:
            self.failed[name] = f"{failures} runs failed in a row, the last with {type(err).__name__}: {err}"
            log.error("model %s set aside: %s", name, self.failed[name])
            if name in self._loaded:
                self._drop(name, "after failing every run")

    def close(self) -> None:
        """Drop every loaded model."""
        self._evict_all(keep=None, why="on close")

    def _load_making_room(self, spec: ModelSpec) -> Any:
        """`_load`, retried once with every other model dropped when the GPU runs out of memory."""
        import torch

        try:
            return self._load(spec)
        except torch.cuda.OutOfMemoryError:
            if not self._loaded:
                raise
            self._evict_all(keep=None, why=f"to make room for {spec.name} after running out of memory")
            return self._load(spec)

    def _load(self, spec: ModelSpec) -> Any:
        import diffusers
        import torch

        kwargs = dict(spec.load_kwargs)
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or "float16"
        kwargs["dtype"] = torch.float32 if self.device.type == "cpu" else getattr(torch, dtype)
        if spec.motion_adapter:
            from validator.generation.video import load_motion_adapter

            kwargs["motion_adapter"] = load_motion_adapter(spec.motion_adapter, spec.motion_adapter_file, kwargs["dtype"])
        pipe = getattr(diffusers, spec.pipeline).from_pretrained(spec.path, **kwargs)
        if spec.scheduler:
            pipe.scheduler = getattr(diffusers, spec.scheduler).from_config(pipe.scheduler.config, **spec.scheduler_kwargs)
        if self.cpu_offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _evict_for(self, extra_gb: float, keep: str | None = None) -> None:
        while self.used_gb() + extra_gb > self.budget_gb:
            victim = next((name for name in self._loaded if name != keep), None)
            if victim is None:
                return
            self._drop(victim, "to stay within the memory budget")

    def _evict_all(self, keep: str | None, why: str) -> None:
        for name in [n for n in self._loaded if n != keep]:
            self._drop(name, why)

    def _free_cache(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _drop(self, name: str, why: str) -> None:
        self._loaded.pop(name)
        self._free_cache()
        log.info("evicted model %s %s (loaded: %s; %.2f/%.1f GB)", name, why, ", ".join(self._loaded) or "none",
                 self.used_gb(), self.budget_gb)
