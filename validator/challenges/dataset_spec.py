"""Where real challenge images come from: a source's spec (`DatasetSpec`), parsed from the command line, and how
it is streamed.

Every source is read with `datasets.load_dataset(..., streaming=True)`, one code path for a hub id (nothing large
is downloaded: rows stream in), a local parquet file / glob / folder of parquet files (`"parquet"` builder) and a
folder of images (`"imagefolder"` builder). The image column is left undecoded, so `RealImageSource` decodes each
row with the codec's limits; the stream is shuffled with a seed, which with the row's position identifies a row.
"""

import re
from dataclasses import dataclass
from hashlib import sha1
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from bitmind.hub_id import is_hub_id
from bitmind.stream_shuffle import shuffle_stream

__all__ = [
    "DEFAULT_REAL_DATASETS",
    "PACKAGED",
    "DatasetSpec",
    "packaged_real_sample",
    "parse_dataset_list",
]

# The ten real-image datasets subnet-34 validators have used (all with an `image` column and a `train` split).
DEFAULT_REAL_DATASETS: tuple[str, ...] = (
    "bitmind/bm-real",
    "bitmind/open-images-v7",
    "bitmind/celeb-a-hq",
    "bitmind/ffhq-256",
    "bitmind/MS-COCO-unique-256",
    "bitmind/AFHQ",
    "bitmind/lfw",
    "bitmind/caltech-256",
    "bitmind/caltech-101",
    "bitmind/dtd",
)

_LOCAL_SUFFIXES = {".parquet", ".jpg", ".jpeg", ".png", ".webp"}
_SPEC_KEYS = {"split", "name", "image", "label_column", "labels", "shuffle_buffer"}


@dataclass(frozen=True)
class DatasetSpec:
    """Where real images come from: a hub id, a local parquet file / glob / folder, or a folder of images.

    `labels` keeps only rows whose `label_column` value is one of them (e.g. `(0,)` for the real half of a
    mixed real/fake parquet). `split` and `name` (the hub config) apply to hub datasets only.
    """

    path: str
    split: str = "train"
    name: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    labels: tuple[int, ...] | None = None
    shuffle_buffer: int = 200

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError("dataset path must be a non-empty string")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(int(label) for label in self.labels))

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        """From a command-line value: `PATH[?split=S&name=C&image=COL&label_column=COL&labels=0,2&shuffle_buffer=N]`."""
        path, _, query = text.strip().partition("?")
        try:
            options = parse_qs(query, keep_blank_values=True, strict_parsing=True) if query else {}
        except ValueError:
            raise ValueError(f"malformed dataset options in {text!r}") from None
        unknown = set(options) - _SPEC_KEYS
        if unknown:
            raise ValueError(f"unknown dataset option(s) {sorted(unknown)} in {text!r}; known: {sorted(_SPEC_KEYS)}")
        one = {key: values[-1] for key, values in options.items()}
        renames = {"split": "split", "name": "name", "image": "image_column", "label_column": "label_column"}
        kwargs: dict[str, Any] = {attr: one[key] for key, attr in renames.items() if key in one}
        try:
            if "labels" in one:
                kwargs["labels"] = tuple(int(v) for v in one["labels"].split(",") if v.strip())
            if "shuffle_buffer" in one:
                kwargs["shuffle_buffer"] = int(one["shuffle_buffer"])
        except ValueError:
            raise ValueError(f"labels must be comma-separated integers, shuffle_buffer an integer: {text!r}") from None
        return cls(path=path, **kwargs)

    @property
    def is_hub(self) -> bool:
        local = Path(self.path).expanduser()
        return is_hub_id(self.path) and local.suffix.lower() not in _LOCAL_SUFFIXES and not local.exists()

    @property
    def id(self) -> str:
        """Short human-readable name for logs and metadata."""
        if self.is_hub:
            config = f"/{self.name}" if self.name else ""
            return self.path + config + (f":{self.split}" if self.split != "train" else "")
        return "/".join(Path(self.path).expanduser().parts[-2:]) or self.path

    @property
    def slug(self) -> str:
        """Folder name of this source's cache: readable, unique per spec."""
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", self.id)[:60]
        digest = sha1(repr(self).encode()).hexdigest()[:8]
        return f"{readable}-{digest}"

    def load(self):  # -> datasets.IterableDataset
        """The rows as a streaming dataset (same `load_dataset` call an operator would make)."""
        import datasets

        if self.is_hub:
            return datasets.load_dataset(self.path, name=self.name, split=self.split, streaming=True)
        local = Path(self.path).expanduser()
        if any(char in self.path for char in "*?["):
            return datasets.load_dataset("parquet", data_files=str(local), split="train", streaming=True)
        if local.is_dir():
            parquet_files = sorted(str(p) for p in local.rglob("*.parquet"))
            if parquet_files:
                return datasets.load_dataset("parquet", data_files=parquet_files, split="train", streaming=True)
            return datasets.load_dataset("imagefolder", data_dir=str(local), split="train", streaming=True)
        if local.is_file() and local.suffix.lower() == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(local), split="train", streaming=True)
        if local.exists():
            raise ValueError(f"{self.path}: not a parquet file or a folder (of parquet files or images)")
        raise FileNotFoundError(f"{self.path}: no such file or folder, and not a hub dataset id")

    def open_stream(self, seed: int):  # -> datasets.IterableDataset
        """`load()` with the image column left undecoded (we decode with limits) and a seeded shuffle."""
        import datasets

        stream = self.load()
        features = stream.features
        if features is not None:
            if self.image_column not in features:
                raise ValueError(f"{self.id}: no column {self.image_column!r}; columns are {sorted(features)}")
            if isinstance(features[self.image_column], datasets.Image):
                stream = stream.cast_column(self.image_column, datasets.Image(decode=False))
        if self.shuffle_buffer:
            # One shard at a time (shard order is still shuffled): a source's stream is dropped at every failure and
            # reopened every pass, and an interleaved one costs a 5 s sleep each time (bitmind.stream_shuffle).
            stream = shuffle_stream(stream, seed, self.shuffle_buffer, max_shards=1)
        return stream

    def accepts(self, row: dict[str, Any]) -> bool:
        if self.labels is None:
            return True
        if self.label_column not in row:
            raise ValueError(f"{self.id}: no label column {self.label_column!r}; columns are {sorted(row)}")
        return row[self.label_column] in self.labels


def packaged_real_sample() -> DatasetSpec:
    """The small real-image sample shipped in the package (see validator/assets/LICENSES.md), for offline demos."""
    folder = files("validator").joinpath("assets", "real_sample")
    return DatasetSpec(path=str(folder), shuffle_buffer=0)


PACKAGED = "packaged"


def parse_dataset_list(text: str) -> list[DatasetSpec]:
    """A comma-separated dataset list (`--validator.real_datasets`, `--generator.real_source`) into specs; `packaged` is the shipped sample. ValueError when malformed or empty.

    A comma also separates the values of a `labels=0,2` option: a part starting with an integer right after a
    `labels=` list continues that entry.
    """
    entries: list[str] = []
    for part in (piece.strip() for piece in text.split(",")):
        if entries and re.search(r"labels=[-\d,]*$", entries[-1]) and re.fullmatch(r"-?\d+(&.*)?", part):
            entries[-1] += "," + part
        elif part:
            entries.append(part)
    if not entries:
        raise ValueError("no real dataset given")
    return [packaged_real_sample() if entry == PACKAGED else DatasetSpec.parse(entry) for entry in entries]
