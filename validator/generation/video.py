"""What text-to-video models need beyond an image pipeline: a motion adapter (AnimateDiff) loaded beside the base
model, and the pipelines' frame output turned into one (T, H, W, 3) uint8 array for the clip cache.

AnimateDiff-Lightning ships its distilled motion module as ONE safetensors file in a repo without a diffusers
config (`ByteDance/AnimateDiff-Lightning`, `animatediff_lightning_4step_diffusers.safetensors`), so the adapter is
built from the default `MotionAdapter` config (or the folder's own `config.json`) and the file's weights are loaded
into it; an adapter saved with `save_pretrained` (a folder or a hub repo) loads with `from_pretrained`.
"""

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["clip_frames", "load_motion_adapter"]


def load_motion_adapter(path: str, weights_file: str | None, dtype: Any) -> Any:
    """A `diffusers.MotionAdapter` from a folder or hub repo (`weights_file`: one safetensors file in it)."""
    from diffusers import MotionAdapter

    if weights_file is None:
        return MotionAdapter.from_pretrained(path, dtype=dtype)
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    if folder.is_dir():
        file = folder / weights_file
        config = MotionAdapter.load_config(folder) if (folder / "config.json").is_file() else None
    else:
        from huggingface_hub import hf_hub_download

        file, config = Path(hf_hub_download(path, weights_file)), None
    adapter = MotionAdapter.from_config(config) if config else MotionAdapter()
    adapter.load_state_dict(load_file(str(file)))
    return adapter.to(dtype)


def clip_frames(frames: Any) -> np.ndarray:
    """A pipeline's frames of ONE video (PIL images, or an array in [0, 1] or uint8, (T, H, W, C)) as (T, H, W, 3)
    uint8; ValueError for anything else."""
    if isinstance(frames, (list, tuple)) and frames and all(isinstance(frame, Image.Image) for frame in frames):
        return np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
    array = np.asarray(frames.cpu().float() if hasattr(frames, "cpu") else frames)
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or not len(array):
        raise ValueError(f"expected the frames of one video, (T, H, W, 3), got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array
