"""Seeding the validator's synthetic cache with a folder of AI-generated images (by default the sample shipped in
the package, see validator/assets/LICENSES.md), so fakes can be challenged before any generator has run (the
local demo, an offline validator)."""

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from bitmind.image_codec import decode_bytes
from validator.challenges.cache import ImageCache

__all__ = ["FAKE_SAMPLE_MODEL", "SampleError", "packaged_synthetic_sample", "seed_synthetic_cache"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# The packaged AI-generated sample and the model its metadata names.
FAKE_SAMPLE = ("assets", "synthetic_sample")
FAKE_SAMPLE_MODEL = "cifake-sd14"


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
