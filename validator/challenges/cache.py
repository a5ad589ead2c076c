"""On-disk image cache shared between processes: any number of writers (one generator worker per GPU, or the
real-data filler) and many readers.

Layout: every item is an image file `<stem>.png|.jpg` plus a JSON sidecar `<stem>.json`, and for a partly generated
(semi-synthetic) image its per-pixel mask `<stem>.mask.png` (`bitmind.mask_codec`). Stems start with the
creation time in nanoseconds, so name order is age order. Writes are atomic (`bitmind.atomic`: a hidden temp file in
the same folder, fsync, `os.replace`), image first and sidecar last: an item exists iff its sidecar exists, and a reader
never sees half an item. Eviction removes the sidecar first for the same reason. Readers skip, warn about and
remove broken items (unreadable sidecar, missing or undecodable image) instead of failing.
"""

import contextlib
import fcntl
import io
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bitmind.atomic import atomic_write_bytes, temp_target
from bitmind.image_codec import DecodeLimits, decode_bytes, to_rgb
from bitmind.json_safe import json_safe
from bitmind.mask_codec import mask_from_png, mask_to_png

__all__ = ["CacheItem", "ImageCache"]

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"
LOCK_NAME = ".writers.lock"  # hidden: listings and the orphan sweep skip it
MASK_SUFFIX = ".mask.png"
FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg"), "jpg": ("JPEG", ".jpg")}
# Temp files and sidecar-less images younger than this may belong to a writer that is mid-`put`.
ORPHAN_GRACE_S = 600.0
SWEEP_INTERVAL_S = 60.0
SAMPLE_ATTEMPTS = 8
# The key `sample` adds to the metadata it returns: which item was read (handy in challenge logs).
ITEM_KEY = "cache_item"
# Items were checked when their writer decoded them; reading them back only guards memory (a file replaced by a
# pixel bomb), so shape limits are off and the byte limit is the cache's own cap.
ITEM_MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class CacheItem:
    """One complete item: its stem (age-ordered id), image and sidecar paths, and size on disk."""

    stem: str
    image_path: Path | None  # None for a broken item whose image is gone
    sidecar_path: Path
    nbytes: int
    mask_path: Path | None = None  # the generated-pixel mask of a semi-synthetic item


class ImageCache:
    """A size-capped folder of images with JSON metadata, safe for concurrent writers and readers (unique stems,
    atomic files, eviction under a lock).

    `max_bytes` / `max_items` cap what `put` leaves behind (oldest items are evicted first); readers never
    evict, so a reader may open the cache with the default caps.
    """

    def __init__(self, root: str | Path, max_bytes: int = 2 * 1024**3, max_items: int | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be at least 1 (or None), got {max_items}")
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.max_items = max_items
        self._read_limits = DecodeLimits(
            max_bytes=self.max_bytes, max_pixels=ITEM_MAX_PIXELS, max_aspect_ratio=math.inf, min_side=1
        )
        self._last_sweep = float("-inf")

    def __repr__(self) -> str:
        return f"ImageCache({str(self.root)!r}, max_bytes={self.max_bytes}, max_items={self.max_items})"

    # ------------------------------------------------------------------ listing
    def _stems(self) -> list[str]:
        """Stems of complete items (those with a sidecar), oldest first."""
        try:
            with os.scandir(self.root) as entries:
                stems = [
                    entry.name[: -len(SIDECAR_SUFFIX)]
                    for entry in entries
                    if entry.name.endswith(SIDECAR_SUFFIX) and not entry.name.startswith(".")
                ]
        except FileNotFoundError:
            return []
        stems.sort()
        return stems

    def __len__(self) -> int:
        return len(self._stems())

    def items(self) -> list[CacheItem]:
        """Complete items, oldest first, with their size on disk (image + sidecar)."""
        sizes: dict[str, int] = {}
        try:
            with os.scandir(self.root) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        sizes[entry.name] = entry.stat().st_size
                    except FileNotFoundError:  # removed by another process while listing
                        continue
        except FileNotFoundError:  # the folder was removed (an operator reclaiming disk): empty, `put` makes it again
            return []
        items = []
        for name in sorted(sizes):
            if not name.endswith(SIDECAR_SUFFIX):
                continue
            stem = name[: -len(SIDECAR_SUFFIX)]
            image_name = next((stem + ext for _, ext in FORMATS.values() if stem + ext in sizes), None)
            mask_name = stem + MASK_SUFFIX if stem + MASK_SUFFIX in sizes else None
            nbytes = sizes[name] + (sizes[image_name] if image_name else 0) + (sizes[mask_name] if mask_name else 0)
            image_path = self.root / image_name if image_name else None
            mask_path = self.root / mask_name if mask_name else None
            items.append(CacheItem(stem, image_path, self.root / name, nbytes, mask_path))
        return items

    def total_bytes(self) -> int:
        return sum(item.nbytes for item in self.items())

    def is_full(self) -> bool:
        """True when one more item of average size would push the cache over a cap (and so evict)."""
        items = self.items()
        if not items:
            return False
        if self.max_items is not None and len(items) >= self.max_items:
            return True
        total = sum(item.nbytes for item in items)
        return total + total / len(items) > self.max_bytes

    # ------------------------------------------------------------------ writing
    def put(
        self,
        image: Image.Image,
        metadata: dict[str, Any],
        fmt: str = "png",
        quality: int = 95,
        mask: np.ndarray | None = None,
    ) -> Path:
        """Store `image` (converted to RGB) with `metadata`; returns the image path. Evicts oldest items after.

        `mask`: for a partly generated image, its [H, W] map in [0, 1] of generated pixels (stored as a PNG beside
        the image). Raises ValueError for an unknown format, non-JSON-serialisable metadata, a mask that is not
        the image's size or not in [0, 1], an image of more than ITEM_MAX_PIXELS pixels (a reader would refuse it
        and delete the item), or an item larger than the cap.
        """
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
        if image.width * image.height > ITEM_MAX_PIXELS:
            raise ValueError(f"an image of {image.width}x{image.height} pixels is over the {ITEM_MAX_PIXELS}-pixel "
                             "limit a reader of the cache applies")
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            pil_format, ext = FORMATS[fmt.lower()]
        except KeyError:
            raise ValueError(f"unknown image format {fmt!r}; use one of {sorted(FORMATS)}") from None
        image = to_rgb(image)
        mask_bytes = b""
        if mask is not None:
            if np.shape(mask) != (image.height, image.width):
                raise ValueError(f"mask of shape {np.shape(mask)} does not fit a {image.width}x{image.height} image")
            mask_bytes = mask_to_png(mask)
        stem = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        sidecar = {
            "image": stem + ext,
            "created": time.time(),
            "width": image.width,
            "height": image.height,
            "metadata": metadata,
        }
        if mask is not None:
            sidecar["mask"] = stem + MASK_SUFFIX
        try:
            sidecar_bytes = json.dumps(json_safe(sidecar), allow_nan=False).encode("utf-8")
        except TypeError as exc:
            raise ValueError(f"metadata cannot be stored as JSON: {exc}") from exc
        buffer = _encode(image, pil_format, quality)
        item_bytes = len(buffer) + len(sidecar_bytes) + len(mask_bytes)
        if item_bytes > self.max_bytes:
            raise ValueError(f"item of {item_bytes} bytes is larger than the cache cap of {self.max_bytes}")
        image_path = self.root / (stem + ext)
        mask_path = self.root / (stem + MASK_SUFFIX)
        try:
            if mask_bytes:
                atomic_write_bytes(mask_path, mask_bytes)
            atomic_write_bytes(image_path, buffer)
            atomic_write_bytes(self.root / (stem + SIDECAR_SUFFIX), sidecar_bytes)
        except BaseException:
            image_path.unlink(missing_ok=True)
            mask_path.unlink(missing_ok=True)
            raise
        self.evict()
        return image_path

    def _remove(self, stem: str, image_name: str | None = None) -> None:
        """Remove an item: sidecar first (the item vanishes atomically for readers), then its image and mask."""
        (self.root / (stem + SIDECAR_SUFFIX)).unlink(missing_ok=True)
        names = [image_name] if image_name else [stem + ext for _, ext in FORMATS.values()]
        for name in [*names, stem + MASK_SUFFIX]:
            (self.root / name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """An exclusive lock shared by every process writing this folder (`flock` on a hidden lock file), so that
        concurrent writers evict one after the other from a fresh listing instead of each removing its own share
        of the same excess. The kernel drops the lock when a holder dies."""
        with open(self.root / LOCK_NAME, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def evict(self) -> int:
        """Remove oldest items until under both caps, and stale temp / orphan files; returns items removed.
        Runs under the folder's writer lock."""
        with self._exclusive():
            return self._evict_locked()

    def _evict_locked(self) -> int:
        items = self.items()
        total = sum(item.nbytes for item in items)
        removed = 0
        while items and (total > self.max_bytes or (self.max_items is not None and len(items) > self.max_items)):
            oldest = items.pop(0)
            self._remove(oldest.stem, oldest.image_path.name if oldest.image_path else None)
            total -= oldest.nbytes
            removed += 1
        if removed:
            log.debug("cache %s: evicted %d oldest items, %d left (%d bytes)", self.root, removed, len(items), total)
        if time.monotonic() - self._last_sweep > SWEEP_INTERVAL_S:
            self._last_sweep = time.monotonic()
            self._remove_stale(
                keep={path.name for item in items for path in (item.image_path, item.mask_path) if path}
            )
        return removed

    def _remove_stale(self, keep: set[str]) -> None:
        """Temp files and sidecar-less images left by crashed writers, once older than the grace period."""
        cutoff = time.time() - ORPHAN_GRACE_S
        with os.scandir(self.root) as entries:
            for entry in entries:
                name = entry.name
                stale_candidate = temp_target(name) is not None or (
                    name not in keep and any(name.endswith(ext) for _, ext in FORMATS.values())
                )
                if not stale_candidate:
                    continue
                try:
                    stem = name.split(".", 1)[0]  # stems hold no dot; a mask is <stem>.mask.png
                    if entry.stat().st_mtime < cutoff and not (self.root / (stem + SIDECAR_SUFFIX)).exists():
                        Path(entry.path).unlink(missing_ok=True)
                except FileNotFoundError:
                    continue

    # ------------------------------------------------------------------ reading
    def sample(self, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]] | None:
        """A uniformly chosen item as (RGB image, metadata), or None when the cache holds no readable item.

        The metadata is the dict given to `put`, plus `cache_item` (the item's stem).
        """
        drawn = self.sample_with_mask(rng)
        return None if drawn is None else drawn[:2]

    def sample_with_mask(self, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any], np.ndarray | None] | None:
        """As `sample`, plus the item's generated-pixel mask ([H, W] float32 in [0, 1]) or None if it has none."""
        stems = self._stems()
        for _ in range(SAMPLE_ATTEMPTS):
            if not stems:
                return None
            index = int(rng.integers(len(stems)))
            stem = stems.pop(index)
            loaded = self._load(stem)
            if loaded is not None:
                return loaded
        log.warning("cache %s: no readable item after %d attempts", self.root, SAMPLE_ATTEMPTS)
        return None

    def _load(self, stem: str) -> tuple[Image.Image, dict[str, Any], np.ndarray | None] | None:
        sidecar_path = self.root / (stem + SIDECAR_SUFFIX)
        try:
            raw = sidecar_path.read_bytes()
        except FileNotFoundError:  # evicted since listing: not an error
            return None
        try:
            sidecar = json.loads(raw)
            image_name = sidecar["image"]
            metadata = sidecar["metadata"]
            mask_name = sidecar.get("mask")
            if not isinstance(image_name, str) or Path(image_name).name != image_name or not isinstance(metadata, dict):
                raise ValueError("bad 'image' or 'metadata' field")
            if mask_name is not None and mask_name != stem + MASK_SUFFIX:
                raise ValueError("bad 'mask' field")
        except (ValueError, KeyError, TypeError) as exc:
            self.discard(stem, f"corrupt sidecar ({exc})")
            return None
        image_path = self.root / image_name
        try:
            image = decode_bytes(image_path.read_bytes(), self._read_limits)
        except FileNotFoundError:
            if sidecar_path.exists():  # sidecar without image: broken; otherwise evicted meanwhile
                self.discard(stem, "image file missing", image_name=image_name)
            return None
        except (OSError, ValueError) as exc:  # ImageDecodeError is a ValueError
            self.discard(stem, f"unreadable image ({exc})", image_name=image_name)
            return None
        mask = None
        if mask_name is not None:
            try:
                mask = mask_from_png(
                    (self.root / mask_name).read_bytes(), (image.height, image.width), self.max_bytes
                )
            except FileNotFoundError:
                if sidecar_path.exists():
                    self.discard(stem, "mask file missing", image_name=image_name)
                return None
            except (OSError, ValueError) as exc:  # MaskDecodeError is a ValueError
                self.discard(stem, f"unreadable mask ({exc})", image_name=image_name)
                return None
        return image, {**metadata, ITEM_KEY: stem}, mask

    def discard(self, stem: str, reason: str, *, image_name: str | None = None) -> bool:
        """Remove a broken item and log why. Why public: a layer on top (the clip cache) finds items whose image
        decodes but whose own metadata does not parse, and must remove them the way this cache's readers do, so
        they are not drawn again. Never raises (a read-only folder is logged and skipped); False, removing
        nothing, for a `stem` that is not a plain file name in this folder (a path, '..', a hidden name)."""
        if not isinstance(stem, str) or not stem or stem.startswith(".") or "\x00" in stem or Path(stem).name != stem:
            log.warning("cache %s: not removing %r (%s): not an item stem", self.root, stem, reason)
            return False
        log.warning("cache %s: removing broken item %s: %s", self.root, stem, reason)
        try:
            self._remove(stem, image_name)
        except OSError as exc:  # e.g. a read-only mount: skip it, never fail the caller
            log.warning("cache %s: could not remove %s: %s", self.root, stem, exc)
        return True


def _encode(image: Image.Image, pil_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if pil_format == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=pil_format)
    return buffer.getvalue()
