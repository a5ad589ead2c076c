"""One synthetic challenge image: real image → caption → rewrite → moderate → generate → cache.

Or, for a share `inpaint_share` of the rounds, one semi-synthetic image: the same real image gets a random region
(`validator.region_mask`) regenerated from its caption by an inpainting model, and goes to the semi-synthetic cache
with its mask and metadata (kind, model, mask area and shape). For a share `video_share` of the rounds, a
text-to-video model makes a clip from the prompt instead; it goes to the clip cache (`validator.video.cache`) the
validator's video challenges read.

The two halves are separate calls, `make_prompt()` (captioner and rewriter) and `render()` (diffusion model and
cache), so that the generator can make a round's prompts before its images and move models between the GPU and host
RAM once per round (see `memory.py`); `run_once()` does both for one image.

Each cached image carries a JSON sidecar with everything needed to audit or reproduce it: the prompt, the original
caption, the model and its drawn call arguments, the seed, the real image it was modelled on, and timings.
"""

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

import bitmind
from bitmind.json_safe import json_safe
from validator.challenges.cache import ImageCache
from validator.generation.captioner import Captioner
from validator.challenges.mix import SEMI_SYNTHETIC, SYNTHETIC
from validator.generation.diffusion import (
    INPAINTING,
    TEXT_TO_IMAGE,
    TEXT_TO_VIDEO,
    DiffusionModelPool,
    GeneratedClip,
    GeneratedImage,
    ModelLoadError,
    NoModelAvailable,
)
from validator.generation.moderation import moderate_prompt
from validator.generation.prompt_rewriter import PromptRewriter
from validator.region_mask import SHAPES, random_region_mask
from validator.video.cache import ClipCache

__all__ = [
    "PROMPT_MODES",
    "STATIC_PROMPTS",
    "GenerationRecord",
    "ImageSource",
    "NoSourceImage",
    "PromptRecord",
    "SyntheticImagePipeline",
]

log = logging.getLogger(__name__)

PROMPT_MODES = ("caption", "static")
# Used with --generator.prompt_mode static, when no captioner is available.
STATIC_PROMPTS: tuple[str, ...] = (
    "a photo of a golden retriever running on a sandy beach at sunset",
    "a busy city street at night with wet pavement reflecting neon signs",
    "a close-up portrait of an elderly man with a grey beard, natural window light",
    "a bowl of fresh fruit on a wooden kitchen table, soft morning light",
    "a snowy mountain range above a pine forest under a clear blue sky",
    "a red vintage car parked in front of a brick building",
    "an aerial photo of a winding river through green farmland",
    "a cat sleeping on a windowsill next to a potted plant",
    "a crowded farmers market with stalls of vegetables, documentary photo",
    "a modern living room with a grey sofa and large windows, interior photography",
    "a young woman reading a book in a cafe, shallow depth of field",
    "a lighthouse on a rocky coast during a storm, dramatic clouds",
)


class ImageSource(Protocol):
    """Where real images come from (`validator.challenges.real.RealImageSource`); None while it has none yet."""

    def sample(self, rng: np.random.Generator) -> tuple[Image.Image, int, dict[str, Any]] | None: ...


class NoSourceImage(RuntimeError):
    """The real-image source has nothing cached yet (its filler is still downloading)."""


@dataclass(frozen=True)
class PromptRecord:
    """A moderated prompt with its provenance (metadata fields) and how long each step took."""

    info: dict[str, Any]
    timings: dict[str, float]
    seconds: float
    image: Image.Image | None = None  # the real image the caption describes (what inpainting starts from)


@dataclass(frozen=True)
class GenerationRecord:
    """A cached synthetic image: where it is and the metadata written beside it."""

    path: Path
    metadata: dict[str, Any]


def _source_fields(metadata: dict[str, Any], max_chars: int = 2000) -> dict[str, Any]:
    """The JSON-storable fields of a source's metadata (dataset, row, ...): enough to find the real image again.
    Fields JSON cannot hold, or longer than `max_chars` as JSON, are left out."""
    kept = {}
    for key, value in metadata.items():
        try:
            value = json_safe(value)
        except TypeError:
            continue
        if len(json.dumps(value)) <= max_chars:
            kept[str(key)] = value
    return kept


class SyntheticImagePipeline:
    """Makes synthetic images one at a time and writes them to an `ImageCache`."""

    def __init__(
        self,
        pool: DiffusionModelPool,
        cache: ImageCache,
        *,
        source: ImageSource | None = None,
        captioner: Captioner | None = None,
        rewriter: PromptRewriter | None = None,
        prompt_mode: str = "caption",
        resolution: int | None = None,
        steps: int | None = None,
        image_format: str = "png",
        seed: int | None = None,
        static_prompts: tuple[str, ...] = STATIC_PROMPTS,
        semi_cache: ImageCache | None = None,
        inpaint_share: float = 0.0,
        video_cache: ClipCache | None = None,
        video_share: float = 0.0,
        video_frames: int | None = None,
    ) -> None:
        if not 0.0 <= video_share <= 1.0:
            raise ValueError(f"video_share must be in [0, 1], got {video_share}")
        if video_share > 0 and (video_cache is None or not pool.available(TEXT_TO_VIDEO)):
            raise ValueError("clips need a clip cache and a text-to-video model in the pool")
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
        if not 0.0 <= inpaint_share <= 1.0:
            raise ValueError(f"inpaint_share must be in [0, 1], got {inpaint_share}")
        if inpaint_share > 0 and (semi_cache is None or prompt_mode != "caption" or not pool.available(INPAINTING)):
            raise ValueError(
                "inpainting needs a semi-synthetic cache, prompt_mode 'caption' (a real image to inpaint) and an "
                "inpainting model in the pool"
            )
        if prompt_mode == "caption" and (source is None or captioner is None):
            raise ValueError("prompt_mode 'caption' needs a real image source and a captioner")
        if prompt_mode == "static" and not static_prompts:
            raise ValueError("prompt_mode 'static' needs at least one prompt")
        self.pool = pool
        self.cache = cache
        self.source = source
        self.captioner = captioner
        self.rewriter = rewriter
        self.prompt_mode = prompt_mode
        self.resolution = resolution
        self.steps = steps
        self.image_format = image_format
        self.static_prompts = static_prompts
        self.semi_cache = semi_cache
        self.inpaint_share = inpaint_share
        self.video_cache = video_cache
        self.video_share = video_share
        self.video_frames = video_frames
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self.rng = random.Random(self.seed)
        self.np_rng = np.random.default_rng(self.seed)

    def pick_task(self) -> str:
        """Text-to-video for a share `video_share` of the draws, inpainting for a share `inpaint_share` of the
        others (each while a model of it still loads), else text-to-image."""
        if self.video_share > 0 and self.pool.available(TEXT_TO_VIDEO) and self.rng.random() < self.video_share:
            return TEXT_TO_VIDEO
        if self.inpaint_share > 0 and self.pool.available(INPAINTING) and self.rng.random() < self.inpaint_share:
            return INPAINTING
        return TEXT_TO_IMAGE

    def pick_model(self, task: str = TEXT_TO_IMAGE) -> str:
        """A model of `task` chosen uniformly among those that have not failed to load."""
        available = self.pool.available(task)
        if not available:
            raise NoModelAvailable(f"every {task} model failed to load: {self.pool.failed}")
        return self.rng.choice(available)

    def run_once(self, model: str | None = None) -> GenerationRecord:
        """Make, cache and return one image; with `model`, that model unless it fails to load."""
        return self.render(self.make_prompt(), model)

    def make_prompt(self) -> PromptRecord:
        """A prompt: from a static list, or from a real image captioned, rewritten and moderated."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        info, image = self._prompt(timings)
        return PromptRecord(info, timings, time.perf_counter() - start, image)

    def render(self, prompt: PromptRecord, model: str | None = None) -> GenerationRecord:
        """Generate `prompt` (with `model` unless it fails to load), cache the image and return where it went.

        An inpainting `model` regenerates a random region of the prompt's real image (semi-synthetic item)."""
        start = time.perf_counter()
        task = self.pool.specs[model].task if model in self.pool.specs else TEXT_TO_IMAGE
        extra: dict[str, Any] = {}
        mask = None
        if task == INPAINTING:
            if prompt.image is None:
                raise ValueError("inpainting needs the real image of a caption prompt")
            shape = SHAPES[self.rng.randrange(len(SHAPES))]
            mask = random_region_mask(prompt.image.size, self.np_rng, shape=shape)
            generated = self._generate(prompt.info["prompt"], model, task, prompt.image, mask)
            extra = {"mask_area": round(float(mask.mean()), 4), "mask_shape": shape}
        else:
            generated = self._generate(prompt.info["prompt"], model, task)
        if isinstance(generated, GeneratedClip):
            extra = {"modality": "video", "fps": generated.fps, "frames": len(generated.frames)}
        timings = {**prompt.timings, "load_s": generated.load_s, "generate_s": generated.generate_s}
        timings["total_s"] = prompt.seconds + time.perf_counter() - start
        spec = generated.model
        metadata = {
            "label": 1,
            "kind": SEMI_SYNTHETIC if task == INPAINTING else SYNTHETIC,
            **prompt.info,
            "model": spec.name,
            "model_path": spec.path,
            "pipeline": spec.pipeline,
            "call_args": generated.call_args,
            "seed": generated.seed,
            **extra,
            "timings": {key: round(value, 4) for key, value in timings.items()},
            "generator_version": bitmind.__version__,
        }
        if isinstance(generated, GeneratedClip):
            return GenerationRecord(self.video_cache.put(generated.frames, generated.fps, metadata), metadata)
        cache = self.semi_cache if task == INPAINTING else self.cache
        path = cache.put(generated.image, metadata, fmt=self.image_format, mask=mask)
        return GenerationRecord(path, metadata)

    def _prompt(self, timings: dict[str, float]) -> tuple[dict[str, Any], Image.Image | None]:
        if self.prompt_mode == "static":
            prompt = moderate_prompt(self.rng.choice(self.static_prompts))
            return {"prompt_mode": "static", "prompt": prompt, "caption": None, "source": None}, None
        drawn = self.source.sample(self.np_rng)
        if drawn is None:
            raise NoSourceImage("no real image is cached yet")
        image, _label, source_meta = drawn
        start = time.perf_counter()
        caption = self.captioner.caption(image)
        timings["caption_s"] = time.perf_counter() - start
        if not caption:
            raise ValueError(f"the captioner produced no caption for {source_meta}")
        rewritten = ""
        if self.rewriter is not None:
            start = time.perf_counter()
            rewritten = self.rewriter.rewrite(caption)
            timings["rewrite_s"] = time.perf_counter() - start
        prompt = moderate_prompt(rewritten) or moderate_prompt(caption)
        if not prompt:
            raise ValueError(f"nothing of the caption {caption!r} survived moderation")
        info = {
            "prompt_mode": "caption",
            "prompt": prompt,
            "caption": caption,
            "rewritten": rewritten or None,
            "captioner": self.captioner.model_id,
            "rewriter": self.rewriter.model_id if self.rewriter else None,
            "source": _source_fields(source_meta),
        }
        return info, image

    def _generate(
        self,
        prompt: str,
        model: str | None,
        task: str = TEXT_TO_IMAGE,
        image: Image.Image | None = None,
        mask: np.ndarray | None = None,
    ) -> GeneratedImage | GeneratedClip:
        """Generate with `model` (or a random one of `task`); a model that fails to load is replaced by another of
        the same task. Inpainting takes `image` and `mask`."""
        name = model if model in self.pool.available(task) else self.pick_model(task)
        while True:
            try:
                if task == INPAINTING:
                    return self.pool.inpaint(
                        name, prompt, image, mask, self.rng, resolution=self.resolution, steps=self.steps
                    )
                if task == TEXT_TO_VIDEO:
                    return self.pool.generate_video(name, prompt, self.rng, resolution=self.resolution,
                                                    steps=self.steps, frames=self.video_frames)
                return self.pool.generate(name, prompt, self.rng, resolution=self.resolution, steps=self.steps)
            except ModelLoadError:
                try:
                    name = self.pick_model(task)
                except NoModelAvailable as err:
                    if task == TEXT_TO_IMAGE:
                        raise
                    # Only this image fails: rounds go on with text-to-image models (pick_task sees none left).
                    raise ModelLoadError(f"no {task} model left: {err}") from err
