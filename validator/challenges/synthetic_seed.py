"""Seeding the validator's synthetic cache with a folder of AI-generated images (by default the sample shipped in
the package, see validator/assets/LICENSES.md), so fakes can be challenged before any generator has run (the
local demo, an offline validator). Without an inpainting model, the semi-synthetic cache is seeded the same way:
regions of those generated images pasted into real images (`validator.challenges.splice`), each with its mask."""

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from bitmind.image_codec import decode_bytes
from validator.challenges.cache import ImageCache
from validator.challenges.mix import SEMI_SYNTHETIC
from validator.challenges.splice import make_semi_synthetic

__all__ = [
    "FAKE_SAMPLE_MODEL",
    "SPLICE_MODEL",
    "SampleError",
    "packaged_synthetic_sample",
    "seed_semi_synthetic_cache",
    "seed_synthetic_cache",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# The packaged AI-generated sample and the model its metadata names.
FAKE_SAMPLE = ("assets", "synthetic_sample")
FAKE_SAMPLE_MODEL = "cifake-sd14"
SPLICE_MODEL = "splice"  # the `model` of seeded semi-synthetic items: pasted, not inpainted


class SampleError(ValueError):
    """The sample folder cannot seed the cache; the message names the file and the reason."""


def packaged_synthetic_sample() -> Path | None:
    """The AI-generated sample shipped in the package, or None when this install has none."""
    folder = files("validator").joinpath(*FAKE_SAMPLE)
    return Path(str(folder)) if folder.is_dir() else None


def _sample_metadata(sample: Path) -> dict[str, dict[str, Any]]:
    """Per-file credit and licence from the sample's `metadata.jsonl` (imagefolder layout), when it has one."""
    path = sample / "metadata.jsonl"
    if not path.is_file():
        return {}
    rows = {}
    try:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                    raise ValueError(f"line {number} is not an object with a file_name")
                rows[row["file_name"]] = row
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SampleError(f"cannot read {path}: {exc}") from exc
    return rows


def seed_synthetic_cache(cache_dir: Path, sample: Path) -> int:
    """Copy the sample's images into the validator's synthetic cache (label 1); returns how many."""
    cache = ImageCache(cache_dir)
    described = _sample_metadata(sample)
    count = 0
    for path in sorted(sample.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        metadata = {"model": FAKE_SAMPLE_MODEL, "source_file": path.name, "sample": described.get(path.name, {})}
        try:
            cache.put(decode_bytes(path.read_bytes()), metadata, fmt="png")
        except (OSError, ValueError) as exc:  # ImageDecodeError is a ValueError, as are the cache's refusals
            raise SampleError(f"cannot seed the synthetic cache with {path}: {exc}") from exc
        count += 1
    if not count:
        raise SampleError(f"{sample} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return count


def _images(folder: str | Path) -> list[Path]:
    paths = [p for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not paths:
        raise SampleError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def seed_semi_synthetic_cache(
    cache_dir: Path, real_sample: str | Path, fake_sample: str | Path, count: int, seed: int = 0
) -> int:
    """Write `count` semi-synthetic items (a real image with a region of a generated one, and its mask) into the
    cache at `cache_dir`; returns how many. Real images and donors are drawn with replacement, seeded by `seed`."""
    if count < 1:
        raise SampleError(f"count must be >= 1, got {count}")
    reals, donors = _images(real_sample), _images(fake_sample)
    cache = ImageCache(cache_dir)
    rng = np.random.default_rng(seed)
    for _ in range(count):
        real_path, donor_path = reals[int(rng.integers(len(reals)))], donors[int(rng.integers(len(donors)))]
        try:
            image, mask = make_semi_synthetic(
                decode_bytes(real_path.read_bytes()), decode_bytes(donor_path.read_bytes()), rng
            )
            metadata = {
                "kind": SEMI_SYNTHETIC, "model": SPLICE_MODEL, "source_file": real_path.name,
                "donor_file": donor_path.name, "mask_area": round(float(mask.mean()), 4),
            }
            cache.put(image, metadata, fmt="png", mask=mask)
        except (OSError, ValueError) as exc:
            raise SampleError(f"cannot seed the semi-synthetic cache from {real_path} and {donor_path}: {exc}") from exc
    return count
