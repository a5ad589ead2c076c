"""Video challenge sources: real videos from hub datasets or local folders, and the generator's clip cache.

Real video datasets on the hub are not row datasets: `nkp37/OpenVid-1M` and `shangxd/imagenet-vidvrd` hold zip
archives of mp4 files (OpenVid's parts are tens of GB each). The reference downloaded whole archives; we open them
through `huggingface_hub.HfFileSystem`, whose files read by HTTP range requests, so `zipfile` fetches the central
directory and then only the members a round takes. A local folder, a local zip, or a folder with a `metadata.csv`
(`path` column relative to the folder, optional `label` column filtered by `?labels=0`, as in the shared
`data/video/` set) go through the same code with the local filesystem.

`VideoClipSource` is `RealImageSource`'s design for video: one clip cache per source, filled by the same background
thread with the same per-source back-off, bounded rounds and refresh; each file is decoded with limits
(`validator.video.container.read_video`) into a segment of at most `segment_s` seconds starting at a random time,
scaled to the challenge's scale (shorter side at most `short_side`, 256: frames are neither stored larger than a
challenge uses nor up-scaled later), and a file that cannot be read is skipped with a warning and counted in
`bad_rows`. 2.5 s holds the clip window (at most 2 s) with room to move it, and keeps a 30 fps segment's cached
sheet to ~75 frames, read back in tens of milliseconds by each challenge. Its `label` is 0 for real
videos; the local demo also fills a label-1 source from the shared generated clips.
"""

import csv
import io
import logging
import random
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from validator.challenges.dataset_spec import DatasetSpec
from validator.challenges.real import RealImageSource
from validator.video.cache import ClipCache
from bitmind.video_codec import VideoDecodeError
from validator.video.container import MAX_FILE_BYTES, read_video

__all__ = [
    "DEFAULT_REAL_VIDEO_DATASETS",
    "SyntheticVideoSource",
    "VideoClipSource",
    "iter_video_files",
]

log = logging.getLogger(__name__)

DEFAULT_REAL_VIDEO_DATASETS: tuple[str, ...] = ("nkp37/OpenVid-1M", "shangxd/imagenet-vidvrd")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".m4v")
ARCHIVE_SUFFIXES = (".zip",)
METADATA_CSV = "metadata.csv"
MAX_CSV_BYTES = 64 * 1024 * 1024

# One video file of a source: (key naming it in logs and metadata, reader of its bytes, scalar fields from the CSV).
VideoFile = tuple[str, Callable[[], bytes], dict[str, Any]]


def _filesystem(spec: DatasetSpec) -> tuple[Any, str]:
    """(fsspec filesystem, root path): the hub dataset repo read by range requests, or the local path."""
    if spec.is_hub:
        from huggingface_hub import HfFileSystem

        return HfFileSystem(), f"datasets/{spec.path}"
    from fsspec.implementations.local import LocalFileSystem

    local = Path(spec.path).expanduser()
    if not local.exists():
        raise FileNotFoundError(f"{spec.path}: no such file or folder, and not a hub dataset id")
    return LocalFileSystem(), str(local.resolve())


def _read_limited(opener: Callable[[], Any], size: int, name: str) -> bytes:
    if size > MAX_FILE_BYTES:
        raise VideoDecodeError(f"{name}: {size} bytes is more than the {MAX_FILE_BYTES}-byte limit")
    with opener() as handle:
        return handle.read(MAX_FILE_BYTES + 1)


def _csv_rows(fs: Any, root: str, spec: DatasetSpec, order: random.Random) -> Iterator[VideoFile]:
    with fs.open(f"{root}/{METADATA_CSV}", "rb") as handle:
        text = handle.read(MAX_CSV_BYTES + 1)
    if len(text) > MAX_CSV_BYTES:
        raise ValueError(f"{spec.id}: {METADATA_CSV} is larger than {MAX_CSV_BYTES} bytes")
    rows = list(csv.DictReader(io.StringIO(text.decode("utf-8", errors="replace"))))
    if rows and "path" not in rows[0]:
        raise ValueError(f"{spec.id}: {METADATA_CSV} has no 'path' column; columns are {sorted(rows[0])}")
    if spec.labels is not None:
        if rows and spec.label_column not in rows[0]:
            raise ValueError(f"{spec.id}: {METADATA_CSV} has no label column {spec.label_column!r}")
        wanted = {str(label) for label in spec.labels}
        rows = [row for row in rows if str(row.get(spec.label_column, "")).strip() in wanted]
    order.shuffle(rows)
    for row in rows:
        relative = str(row.get("path") or "")
        if not relative or relative.startswith("/") or ".." in Path(relative).parts:
            log.warning("video source %s: skipping row with unsafe path %r", spec.id, relative)
            continue
        path = f"{root}/{relative}"
        fields = {key: value[:200] for key, value in row.items() if isinstance(key, str) and isinstance(value, str)}
        yield path, lambda path=path: _read_file(fs, path), fields


def _read_file(fs: Any, path: str) -> bytes:
    return _read_limited(lambda: fs.open(path, "rb"), int(fs.size(path) or 0), path)


def _archive_members(fs: Any, archive: str, order: random.Random) -> Iterator[VideoFile]:
    handle = fs.open(archive, "rb")
    try:
        with zipfile.ZipFile(handle) as bundle:
            members = [info for info in bundle.infolist()
                       if not info.is_dir() and info.filename.lower().endswith(VIDEO_SUFFIXES)]
            order.shuffle(members)
            for info in members:
                key = f"{archive}!{info.filename}"
                reader = (lambda info=info: _read_limited(lambda: bundle.open(info), info.file_size, key))
                yield key, reader, {"archive_member": info.filename[:200]}
    finally:
        handle.close()


def iter_video_files(spec: DatasetSpec, seed: int) -> Iterator[VideoFile]:
    """Every video file of a source once, in an order shuffled by `seed`: loose files, then archive members."""
    fs, root = _filesystem(spec)
    order = random.Random(seed)
    if fs.isfile(root):
        if not root.lower().endswith(ARCHIVE_SUFFIXES + VIDEO_SUFFIXES):
            raise ValueError(f"{spec.id}: not a video file, a zip archive or a folder")
        if root.lower().endswith(ARCHIVE_SUFFIXES):
            yield from _archive_members(fs, root, order)
        else:
            yield root, lambda: _read_file(fs, root), {}
        return
    if fs.isfile(f"{root}/{METADATA_CSV}"):
        yield from _csv_rows(fs, root, spec, order)
        return
    if spec.labels is not None:
        raise ValueError(f"{spec.id}: labels=... needs a {METADATA_CSV} with a {spec.label_column!r} column")
    files = sorted(fs.find(root))
    loose = [path for path in files if path.lower().endswith(VIDEO_SUFFIXES)]
    archives = [path for path in files if path.lower().endswith(ARCHIVE_SUFFIXES)]
    order.shuffle(loose)
    order.shuffle(archives)
    for path in loose:
        yield path, lambda path=path: _read_file(fs, path), {}
    for archive in archives:
        yield from _archive_members(fs, archive, order)


class VideoClipSource(RealImageSource):
    """Clips from video datasets, cached on disk and refilled by a background thread; `sample` -> (clip, label,
    metadata) where clip is (frames (T, H, W, 3) uint8, fps), or None while nothing is cached."""

    def __init__(
        self,
        datasets: Sequence[DatasetSpec | str] | None = None,
        cache_dir: str | Path = "~/.bitmind/validator/real_video_cache",
        *,
        label: int = 0,
        segment_s: float = 2.5,
        short_side: int = 256,
        max_side: int = 512,
        items_per_source: int = 200,
        fill_batch: int = 2,
        **kwargs: Any,
    ) -> None:
        if label not in (0, 1):
            raise ValueError(f"label must be 0 (real) or 1 (generated), got {label!r}")
        if not segment_s > 0:
            raise ValueError(f"segment_s must be positive, got {segment_s}")
        super().__init__(DEFAULT_REAL_VIDEO_DATASETS if datasets is None else datasets, cache_dir,
                         items_per_source=items_per_source, fill_batch=fill_batch, max_side=max_side, **kwargs)
        self.label = label
        self.segment_s = segment_s
        self.short_side = short_side
        self._decode_rng = np.random.default_rng(self._seeds.integers(2**63))

    @staticmethod
    def _new_cache(root: Path, max_bytes: int, max_items: int) -> ClipCache:
        return ClipCache(root, max_bytes, max_items)

    def sample(self, rng: np.random.Generator) -> tuple[tuple[np.ndarray, float], int, dict[str, Any]] | None:
        drawn = super().sample(rng)
        return None if drawn is None else (drawn[0], self.label, drawn[2])

    def _open_stream(self, state: Any) -> Iterator[VideoFile]:
        return iter_video_files(state.spec, state.stream_seed)

    def _ingest(self, state: Any, position: int, row: VideoFile) -> bool:
        key, read, fields = row
        try:
            video = read_video(read(), max_seconds=self.segment_s, max_side=self.max_side,
                               max_short_side=self.short_side, start_s=None, rng=self._decode_rng)
        except (VideoDecodeError, zipfile.BadZipFile, EOFError, FileNotFoundError) as exc:
            state.bad_rows += 1
            log.warning("video source %s: skipping %s: %s", state.spec.id, key, exc)
            return False
        metadata = {
            "source_type": "real" if self.label == 0 else "dataset_generated",
            "source": state.spec.id,
            "dataset": state.spec.path,
            "file": key[-300:],
            "start_s": round(video.start_s, 3),
            "source_fps": round(video.fps, 3),
            "source_size": list(video.source_size),
            "fields": fields,
        }
        state.cache.put(video.frames, video.fps, metadata)
        return True


class SyntheticVideoSource:
    """Clips the generator's text-to-video models wrote to a `ClipCache`, labelled 1."""

    LABEL = 1

    def __init__(self, cache: str | Path | ClipCache) -> None:
        self.cache = cache if isinstance(cache, ClipCache) else ClipCache(cache)

    def __len__(self) -> int:
        return len(self.cache)

    def sample(self, rng: np.random.Generator) -> tuple[tuple[np.ndarray, float], int, dict[str, Any]] | None:
        drawn = self.cache.sample(rng)
        if drawn is None:
            return None
        clip, metadata = drawn
        return clip, self.LABEL, {"source_type": "synthetic", **metadata}
