"""Clip datasets for training and the arena: every clip becomes its TALL grid image when the dataset is loaded.

Why at load time: a grid image is an image, so the trainer, `bitmind-fit-probe`, the arena and their metrics work
on clips unchanged and report per clip. Two layouts are read:
- a folder with `metadata.csv` (one row per clip: `path` relative to the folder, `label`, and optionally `source`,
  `generator`), read with `datasets.load_dataset("csv", ...)` — e.g. `../shared/data/video`;
- a hub or parquet dataset with a `video` (or `mp4`) column of `datasets.Video` cells or bytes, read like any image
  dataset (`load_spec`), left undecoded so the clip goes through `bitmind.video_file.read_video`'s limits.
The layout is the packaged TALL config's (`base_miner.thumbnail` defaults); grids are stored as lossless PNG so no
second compression is added. A clip that cannot be read is dropped with a count in the log, never failing the load.
"""

import io
import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from base_miner.thumbnail import DEFAULT_FRAMES, DEFAULT_TILE, DEFAULT_TILE_MODE, thumbnail_grid
from bitmind.video_codec import VideoDecodeError
from bitmind.video_file import read_video

__all__ = ["METADATA_FILE", "VIDEO_COLUMNS", "clip_column", "clips_to_grids", "is_clip_folder", "load_clip_folder"]

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.csv"
VIDEO_COLUMNS = ("video", "mp4")


def is_clip_folder(path: Path) -> bool:
    return path.is_dir() and (path / METADATA_FILE).is_file()


def clip_column(column_names: list[str]) -> str | None:
    """The column holding clips in a dataset without an `image` column, or None when it holds none."""
    if "image" in column_names:
        return None
    return next((name for name in VIDEO_COLUMNS if name in column_names), None)


def load_clip_folder(path: Path, split: str):
    """The rows of `path/metadata.csv` (a `datasets.Dataset`), its `path` column resolved inside the folder and
    renamed `video`."""
    from datasets import load_dataset

    ds = load_dataset("csv", data_files=str(path / METADATA_FILE), split=split)
    if "path" not in ds.column_names:
        raise ValueError(f"{path / METADATA_FILE}: no 'path' column (has {ds.column_names})")
    root = path.resolve()

    def resolve(row: dict[str, Any]) -> dict[str, Any]:
        target = (root / str(row["path"] or "")).resolve()
        # A path leaving the folder (../, absolute) is not read; the row is dropped like an unreadable clip.
        return {"video": str(target) if target.is_relative_to(root) and target != root else ""}

    return ds.map(resolve, remove_columns=["path"])


def _clip_source(cell: Any) -> Any:
    """What `read_video` reads from a cell: a path string, bytes, or a `datasets.Video` {bytes, path} cell."""
    if isinstance(cell, dict):
        return cell.get("bytes") or cell.get("path") or ""
    return cell or ""


def _grid_png(cell: Any) -> bytes:
    source = _clip_source(cell)
    if not source:
        raise VideoDecodeError("row names no clip")
    buffer = io.BytesIO()
    thumbnail_grid(read_video(source), DEFAULT_FRAMES, DEFAULT_TILE, DEFAULT_TILE_MODE).save(buffer, format="PNG")
    return buffer.getvalue()


def clips_to_grids(ds, column: str, name: str):
    """`ds` with its clip `column` replaced by an `image` column of grid PNGs; unreadable clips dropped."""
    from datasets import ClassLabel, Dataset, Value, Video
    from datasets import Image as ImageFeature

    if isinstance(ds.features.get(column), Video):
        ds = ds.cast_column(column, Video(decode=False))
    label_feature = ds.features.get("label")
    if isinstance(label_feature, ClassLabel) and set(label_feature.names) == {"real", "fake"}:
        # A videofolder's class ids follow the sorted folder names (fake = 0); labels here mean 1 = generated.
        fake = label_feature.names.index("fake")
        ds = ds.cast_column("label", Value("int64")).map(lambda row: {"label": int(row["label"] == fake)})
    kept = [name for name in ds.column_names if name != column]
    rows: dict[str, list] = {"image": [], **{key: [] for key in kept}}
    dropped = 0
    for row in tqdm(ds, total=len(ds), desc=f"{name}: clips to grids", leave=False):
        try:
            png = _grid_png(row[column])
        except VideoDecodeError as exc:
            log.warning("%s: clip %s dropped: %s", name, str(_clip_source(row[column]))[:80] or "?", exc)
            dropped += 1
            continue
        rows["image"].append({"bytes": png, "path": None})
        for key in kept:  # empty CSV cells (a real clip's generator) come back as None
            rows[key].append("" if row[key] is None and key in ("source", "generator") else row[key])
    log.info("%s: %d clips as %d-frame grids, %d unreadable dropped", name, len(rows["image"]), DEFAULT_FRAMES, dropped)
    return Dataset.from_dict(rows).cast_column("image", ImageFeature(decode=False))
