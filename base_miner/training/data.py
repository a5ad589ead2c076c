"""Datasets for training and the arena: hub ids, parquet files/folders and imagefolder trees, in one row layout.

Every dataset becomes a Hugging Face `datasets.Dataset` with the columns of the shared parquet layout —
`image` ({bytes, path}, left undecoded so one corrupt row cannot break a batch), `label` (0 real, 1 AI-generated),
`source`, `generator` — loaded with `datasets.load_dataset`, the code path a hub dataset takes too.

A dataset spec is `LOCATION[:SPLIT][?KEY=VALUE&...]`: LOCATION is a `.parquet` file, a folder of parquet files, an imagefolder
folder with `real/` and `fake/` sub-folders, or a hub id; SPLIT is a `datasets` split expression such as
`train`, `train[:90%]` or `validation[-500:]` (default `train`). Selectors `KEY=VALUE` (KEY one of source,
generator, label) pick rows by metadata: after `?` they keep only the matching rows (any selector matching);
the trainer's `--holdout` selectors remove the matching rows from training and validate on them instead.
Clip datasets (a folder with `metadata.csv`, or a dataset with a `video` column) load as one TALL grid image per
clip (`base_miner/training/clip_data.py`), so training and the arena report per clip; with the option `frames=N`
after `?` (beside any selectors) each clip becomes N single frames instead, image rows for the image detectors.
A dataset without a `label` column (many public real collections) is read when the spec's only selector is
`label=0` (or `label=1`): the selector then states every row's label.
"""

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from base_miner.training.clip_data import (
    MAX_FRAMES_PER_CLIP,
    clip_column,
    clips_to_images,
    is_clip_folder,
    load_clip_folder,
)
from bitmind.image_codec import DecodeLimits, ImageDecodeError, decode_cell

__all__ = [
    "COLUMNS",
    "DataError",
    "DatasetSpec",
    "Selector",
    "balanced_weights",
    "data_fingerprint",
    "decode_row_image",
    "face_crops",
    "load_spec",
    "parse_selector",
    "select",
    "stratified_subset",
]

log = logging.getLogger(__name__)

COLUMNS = ("image", "label", "source", "generator")
SELECTOR_KEYS = ("source", "generator", "label")
# `:split` suffix: a split name with an optional slice, e.g. `train[:90%]` or `validation[-500:]`.
_SPLIT_SUFFIX = re.compile(r"^(?P<location>.+?):(?P<split>[A-Za-z_][\w.-]*(?:\[[^\]]*\])?)$")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Training and benchmark images may be bigger than challenges, but never absurd.
DATA_DECODE_LIMITS = DecodeLimits(max_bytes=64 * 1024 * 1024, max_pixels=8192 * 8192, min_side=2)


class DataError(ValueError):
    """A dataset spec or selector cannot be resolved to rows with the expected columns."""


@dataclass(frozen=True)
class Selector:
    """`key=value` over row metadata; a row matches when its `key` column equals `value`."""

    key: str
    value: str

    def __str__(self) -> str:
        return f"{self.key}={self.value}"


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives, which split of it to read, and (optionally) which rows and, for a clip dataset, how
    many frames per clip become image rows: `LOCATION[:SPLIT][?k=v&k=v]`, one part of the query may be `frames=N`."""

    location: str
    split: str = "train"
    selectors: tuple[Selector, ...] = ()
    frames: int | None = None

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        text = str(text).strip()
        selectors: tuple[Selector, ...] = ()
        frames = None
        if "?" in text and not _exists(text):
            text, _, query = text.rpartition("?")
            parts = [part for part in query.split("&") if part]
            options = [part for part in parts if part.partition("=")[0].strip() == "frames"]
            if len(options) > 1:
                raise DataError(f"dataset spec {text + '?' + query!r}: frames= given more than once")
            frames = _parse_frames(options[0]) if options else None
            selectors = tuple(parse_selector(part) for part in parts if part not in options)
            if not parts:
                raise DataError(f"dataset spec {text + '?' + query!r}: empty selection after '?'")
        if not text:
            raise DataError("empty dataset spec")
        match = _SPLIT_SUFFIX.match(text)
        if match and not _exists(text):
            return cls(match["location"], match["split"], selectors, frames)
        return cls(text, "train", selectors, frames)

    @property
    def name(self) -> str:
        """A short label for logs and reports: the folder/file or hub name, a non-default split, the selection."""
        path = Path(self.location)
        name = self.location
        if path.is_dir():
            name = path.name
        elif path.exists():  # a file: its folder says more than a generic file name like train.parquet
            name = f"{path.parent.name}/{path.stem}"
        if self.split != "train":
            name += f":{self.split}"
        query = [str(s) for s in self.selectors] + ([f"frames={self.frames}"] if self.frames else [])
        return name + ("?" + "&".join(query) if query else "")


def _parse_frames(text: str) -> int:
    value = text.partition("=")[2].strip()
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_FRAMES_PER_CLIP:
        raise DataError(f"option {text!r}: frames must be a whole number from 1 to {MAX_FRAMES_PER_CLIP}")
    return int(value)


def _exists(text: str) -> bool:
    """Whether a path exists; a name the OS cannot even look up (too long, NUL byte) does not."""
    try:
        return Path(text).exists()
    except (OSError, ValueError):
        return False


def parse_selector(text: str) -> Selector:
    key, sep, value = str(text).partition("=")
    key, value = key.strip(), value.strip()
    if not sep or key not in SELECTOR_KEYS or not value:
        raise DataError(f"selector {text!r} must be KEY=VALUE with KEY one of {list(SELECTOR_KEYS)}")
    if key == "label" and value not in ("0", "1"):
        raise DataError(f"selector {text!r}: label must be 0 (real) or 1 (AI-generated)")
    return Selector(key, value)


def _parquet_files(path: Path) -> list[str]:
    if path.is_file():
        return [str(path)]
    return sorted(str(p) for p in path.rglob("*.parquet"))


def _is_imagefolder(path: Path) -> bool:
    return path.is_dir() and (path / "real").is_dir() and (path / "fake").is_dir()


def _load_imagefolder(path: Path, split: str):
    """real/ and fake/ sub-folders; labels come from the folder names, never from `datasets`' sorted class ids."""
    from datasets import Dataset, load_dataset

    files = [p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise DataError(f"imagefolder {str(path)!r} holds no image files under real/ and fake/")
    ds = load_dataset("imagefolder", data_dir=str(path), split=split)
    names = ds.features["label"].names
    if set(names) != {"real", "fake"}:
        raise DataError(f"imagefolder {str(path)!r} must have exactly the sub-folders real/ and fake/, found {names}")
    fake_id = names.index("fake")
    labels = [int(label == fake_id) for label in ds["label"]]
    from datasets import Image as ImageFeature

    images = ds.cast_column("image", ImageFeature(decode=False))["image"]
    return Dataset.from_dict(
        {"image": images, "label": labels, "source": [path.name] * len(labels), "generator": [""] * len(labels)}
    ).cast_column("image", ImageFeature(decode=False))


def _declared_label(spec: DatasetSpec) -> int | None:
    """The label every row has when the spec's only selectors are `label=V` (one V), else None."""
    values = {selector.value for selector in spec.selectors if selector.key == "label"}
    if spec.selectors and len(values) == 1 and all(selector.key == "label" for selector in spec.selectors):
        return int(values.pop())
    return None


def _normalise(ds, spec: DatasetSpec):
    """Undecoded `image`, int `label` in {0, 1}, string `source`/`generator` (filled when the dataset lacks them)."""
    from datasets import Image as ImageFeature

    declared = _declared_label(spec)
    if "label" not in ds.column_names and "image" in ds.column_names and declared is not None:
        # Many public real collections (the validators' own sources among them) carry no label column: the spec's
        # `?label=0` then states what every row is, instead of selecting rows.
        ds = ds.add_column("label", [declared] * len(ds))
    missing = {"image", "label"} - set(ds.column_names)
    if missing:
        hint = " (a dataset of only real or only generated images: add ?label=0 or ?label=1)"
        hint = hint if missing == {"label"} else ""
        raise DataError(f"dataset {spec.name!r} lacks the column(s) {sorted(missing)} (has {ds.column_names}){hint}")
    ds = ds.cast_column("image", ImageFeature(decode=False))
    if "source" not in ds.column_names:
        ds = ds.add_column("source", [spec.name] * len(ds))
    if "generator" not in ds.column_names:
        ds = ds.add_column("generator", [""] * len(ds))
    # An optional per-pixel `mask` (PNG, bitmind.mask_codec) rides along for detectors that learn where the
    # generated pixels are (base_miner/training/mask_pairs.py).
    if "mask" in ds.column_names:
        ds = ds.cast_column("mask", ImageFeature(decode=False)).select_columns([*COLUMNS, "mask"])
    else:
        ds = ds.select_columns(list(COLUMNS))
    labels = np.asarray(ds["label"])
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise DataError(f"dataset {spec.name!r}: label must be 0 (real) or 1 (AI-generated), found {np.unique(labels)}")
    return ds


def data_fingerprint(ds) -> str | None:
    """What `datasets` knows of a dataset's content and the operations on it (it changes when a local file is
    rewritten): the part of a feature cache's key that says the rows are still the same."""
    return getattr(ds, "_fingerprint", None)


def load_spec(spec: DatasetSpec | str):
    """The rows a spec names, as a `datasets.Dataset` with `COLUMNS`."""
    from datasets import load_dataset

    spec = spec if isinstance(spec, DatasetSpec) else DatasetSpec.parse(spec)
    path = Path(spec.location).expanduser()
    try:
        if _is_imagefolder(path):
            ds = _load_imagefolder(path, spec.split)
        elif is_clip_folder(path):
            ds = load_clip_folder(path, spec.split)
        elif path.exists():
            files = _parquet_files(path)
            if not files:
                raise DataError(f"{str(path)!r} is neither a parquet file, a folder of parquet files, nor real/+fake/")
            ds = load_dataset("parquet", data_files=files, split=spec.split)
        elif spec.location.startswith((".", "/", "~")) or spec.location.count("/") != 1:
            raise DataError(f"dataset {spec.location!r} does not exist (and is not a hub id 'org/name')")
        else:
            ds = load_dataset(spec.location, split=spec.split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFound, hub, split syntax); all mean "no rows"
        raise DataError(f"cannot load dataset {spec.location!r} split {spec.split!r}: {type(exc).__name__}: {exc}") from exc
    if clip_column(ds.column_names):  # a clip dataset: each clip becomes its TALL grid image, or `frames` frames
        ds = clips_to_images(ds, clip_column(ds.column_names), spec.name, spec.frames)
    elif spec.frames:
        raise DataError(f"dataset {spec.name!r}: frames= applies to clip datasets only (this one holds images)")
    ds = _normalise(ds, spec)
    return select(ds, spec.selectors) if spec.selectors else ds


def _row_matches(selectors: Sequence[Selector], source: str, generator: str, label: int) -> bool:
    values = {"source": source, "generator": generator, "label": str(label)}
    return any(values[s.key] == s.value for s in selectors)


def select(ds, selectors: Sequence[Selector], keep_matching: bool = True):
    """The rows that match any selector (or, with `keep_matching=False`, the rows that match none)."""
    if not selectors:
        return ds.select([]) if keep_matching else ds
    mask = [
        _row_matches(selectors, s or "", g or "", int(l)) == keep_matching
        for s, g, l in zip(ds["source"], ds["generator"], ds["label"])
    ]
    return ds.select(np.flatnonzero(mask))


def stratified_subset(ds, limit: int | None, seed: int):
    """At most `limit` rows keeping the label proportions (seeded), so a capped validation set stays fair."""
    if limit is None or len(ds) <= limit:
        return ds
    rng = np.random.default_rng(seed)
    labels = np.asarray(ds["label"])
    chosen: list[int] = []
    for label in (0, 1):
        rows = np.flatnonzero(labels == label)
        take = round(limit * len(rows) / len(labels))
        chosen.extend(rng.choice(rows, size=min(take, len(rows)), replace=False).tolist())
    return ds.select(sorted(chosen))


def balanced_weights(groups: Iterable[tuple]) -> np.ndarray:
    """Sampling weights giving every group (e.g. (dataset, label)) the same total probability."""
    keys = list(groups)
    counts: dict[tuple, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    weights = np.array([1.0 / counts[key] for key in keys], dtype=np.float64)
    return weights / weights.sum()


def decode_row_image(value: dict | None) -> Image.Image:
    """RGB image of an undecoded `image` cell ({bytes, path}) under the training limits; `ImageDecodeError` when it
    is not a readable image."""
    return decode_cell(value, DATA_DECODE_LIMITS)


def face_crops(ds, gate, desc: str = "face crops"):
    """A dataset of the gate's crops of `ds` (PNG, lossless), one row per image with a face; rows without a face
    or with an unreadable image are dropped. Returns (dataset, number of rows dropped)."""
    import io

    from datasets import Dataset
    from datasets import Image as ImageFeature
    from tqdm.auto import tqdm

    rows: dict[str, list] = {column: [] for column in COLUMNS}
    dropped = 0
    for cell, label, source, generator in tqdm(
        zip(ds["image"], ds["label"], ds["source"], ds["generator"]), total=len(ds), desc=desc, leave=False
    ):
        try:
            regions = gate.route(decode_row_image(cell))
        except ImageDecodeError:
            regions = []
        if not regions:
            dropped += 1
            continue
        buffer = io.BytesIO()
        regions[0][1].save(buffer, format="PNG")
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["label"].append(int(label))
        rows["source"].append(source)
        rows["generator"].append(generator)
    crops = Dataset.from_dict(rows).cast_column("image", ImageFeature(decode=False))
    log.info("%s: %d faces from %d images (%d without a face or unreadable)", desc, len(crops), len(ds), dropped)
    return crops, dropped
