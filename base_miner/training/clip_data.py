"""Clip datasets for training and the arena: every clip becomes its TALL grid image when the dataset is loaded, or
(a spec's `?frames=N`) N single frames, images for the image detectors.

Why at load time: a grid image is an image, so the trainer, `bitmind-fit-probe`, the arena and their metrics work
on clips unchanged and report per clip. Frames of generated clips are generated images of video models, families
no image set holds, and real clips add camera content of other kinds; both as plain rows of the same `source`.
Two layouts are read:
- a folder with `metadata.csv` (one row per clip: `path` relative to the folder, `label`, and optionally `source`,
  `generator`), read with `datasets.load_dataset("csv", ...)` — e.g. `../shared/data/video`;
- a hub or parquet dataset with a `video` (or `mp4`) column of `datasets.Video` cells or bytes, read like any image
  dataset (`load_spec`), left undecoded so the clip goes through `bitmind.video_file.read_video`'s limits.
The layout is the packaged TALL config's (`base_miner.thumbnail` defaults); frames are taken at the centres of N
equal segments of the decoded clip (`sample_indices`, as the grid's are); grids and frames are stored as lossless PNG
so no second compression is added. A clip that cannot be read is dropped with a count in the log, never failing the load.
"""

import io
import logging
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from base_miner.thumbnail import DEFAULT_FRAMES, DEFAULT_TILE, DEFAULT_TILE_MODE, sample_indices, thumbnail_grid
from bitmind.video_codec import VideoDecodeError
from bitmind.video_file import FILE_LIMITS, read_video

__all__ = [
    "MAX_FRAMES_PER_CLIP",
    "METADATA_FILE",
    "VIDEO_COLUMNS",
    "clip_column",
    "clips_to_images",
    "is_clip_folder",
    "load_clip_folder",
]

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.csv"
VIDEO_COLUMNS = ("video", "mp4")
MAX_FRAMES_PER_CLIP = FILE_LIMITS.max_frames  # `read_video` keeps no more frames of a clip than this anyway


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


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _clip_images(cell: Any, frames: int | None) -> list[bytes]:
    """The clip's TALL grid (`frames` None) or `frames` single frames, as PNGs."""
    source = _clip_source(cell)
    if not source:
        raise VideoDecodeError("row names no clip")
    clip = read_video(source)
    if frames is None:
        return [_png(thumbnail_grid(clip, DEFAULT_FRAMES, DEFAULT_TILE, DEFAULT_TILE_MODE))]
    return [_png(Image.fromarray(clip[i])) for i in sample_indices(len(clip), frames)]


def clips_to_images(ds, column: str, name: str, frames: int | None = None):
    """`ds` with its clip `column` replaced by an `image` column: one grid PNG per clip, or with `frames` that many
    frame PNGs per clip (each a row with the clip's label, source and generator); unreadable clips dropped."""
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
    what = f"{frames} frames each" if frames else f"{DEFAULT_FRAMES}-frame grids"
    for row in tqdm(ds, total=len(ds), desc=f"{name}: clips to {'frames' if frames else 'grids'}", leave=False):
        try:
            images = _clip_images(row[column], frames)
        except VideoDecodeError as exc:
            log.warning("%s: clip %s dropped: %s", name, str(_clip_source(row[column]))[:80] or "?", exc)
            dropped += 1
            continue
        for png in images:
            rows["image"].append({"bytes": png, "path": None})
            for key in kept:  # empty CSV cells (a real clip's generator) come back as None
                rows[key].append("" if row[key] is None and key in ("source", "generator") else row[key])
    log.info("%s: %d clips as %s (%d images), %d unreadable dropped", name, len(ds) - dropped, what,
             len(rows["image"]), dropped)  # fmt: skip
    return Dataset.from_dict(rows).cast_column("image", ImageFeature(decode=False))
