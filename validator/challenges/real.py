"""Real images for challenges: `datasets`-backed sources filling a size-capped local cache in the background.

Every source is read with `datasets.load_dataset(..., streaming=True)`, one code path for a hub id (nothing large
is downloaded: rows stream in), a local parquet file / glob / folder of parquet files (`"parquet"` builder) and a
folder of images (`"imagefolder"` builder). A daemon thread pulls a bounded batch of rows per source per round
into one `ImageCache` per source; a failing source is logged and retried later with exponential backoff while
the others keep working. Sampling picks a source uniformly (among sources with cached images), then an item
uniformly, so a huge dataset does not drown a small one. With nothing cached yet `sample` returns None.

A row's identity in the metadata is (dataset, split, stream_seed, row): `row` is the row's position in the stream
shuffled with `stream_seed` (`load_dataset(..., streaming=True).shuffle(seed=stream_seed, buffer_size=...)`),
counted before the label filter; non-image scalar columns of the row are copied into `fields`.
"""

import inspect
import io
import logging
import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from hashlib import sha1
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np
from PIL import Image, ImageOps

from bitmind.image_codec import DecodeLimits, to_rgb
from validator.challenges.cache import FORMATS as IMAGE_FORMATS
from validator.challenges.cache import ImageCache

__all__ = [
    "DEFAULT_REAL_DATASETS",
    "DatasetSpec",
    "PACKAGED",
    "RealImageSource",
    "decode_row_image",
    "packaged_real_sample",
    "parse_dataset_list",
]

log = logging.getLogger(__name__)

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

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL_SUFFIXES = {".parquet", ".jpg", ".jpeg", ".png", ".webp"}
_SPEC_KEYS = {"split", "name", "image", "label_column", "labels", "shuffle_buffer"}
MAX_FIELD_CHARS = 200
# Rows scanned per wanted item before a round gives up (bounds a round when a label filter rejects most rows).
MAX_SCAN_PER_ITEM = 50


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
        return bool(_HUB_ID.match(self.path)) and local.suffix.lower() not in _LOCAL_SUFFIXES and not local.exists()

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
            options: dict[str, Any] = {}
            if "max_buffer_input_shards" in inspect.signature(stream.shuffle).parameters:
                # One shard at a time (shard order is still shuffled): interleaving shards starts reader threads
                # and costs a 5 s sleep whenever a stream ends or is dropped (seen with datasets 5.2).
                options["max_buffer_input_shards"] = 1
            stream = stream.shuffle(seed=seed, buffer_size=self.shuffle_buffer, **options)
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


def decode_row_image(value: Any, max_side: int, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """An RGB image no larger than max_side from a row's image value; ValueError/OSError when unusable.

    JPEGs are decoded at a reduced scale when they are much larger than needed (PIL `draft`), which makes big
    photos cheap.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            if len(value["bytes"]) > limits.max_bytes:
                raise ValueError(f"encoded image of {len(value['bytes'])} bytes exceeds {limits.max_bytes}")
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            import datasets

            image = datasets.Image().decode_example(value)  # a local or remote file
        else:
            raise ValueError(f"image value of type {type(value).__name__} holds no image")
        if image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))
        if image.width * image.height > limits.max_pixels:
            raise ValueError(f"image of {image.width}x{image.height} pixels exceeds {limits.max_pixels}")
        if min(image.size) < limits.min_side:
            raise ValueError(f"image of {image.width}x{image.height} is smaller than {limits.min_side} pixels a side")
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image) or image)
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def _scalar_fields(row: dict[str, Any], skip: str) -> dict[str, Any]:
    fields = {}
    for key, value in row.items():
        if key == skip:
            continue
        if isinstance(value, str):
            fields[key] = value[:MAX_FIELD_CHARS]
        elif isinstance(value, (bool, int, float)) or value is None:
            fields[key] = value
    return fields


@dataclass
class _SourceState:
    spec: DatasetSpec
    cache: ImageCache
    stream: Iterator[tuple[int, dict[str, Any]]] | None = None
    stream_seed: int = 0
    pass_added: int = 0
    pass_complete: bool = False
    last_refresh: float = float("-inf")
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    bad_rows: int = 0
    added: int = 0


class RealImageSource:
    """Real challenge images from several datasets, cached on disk and refilled by a background thread.

    One `ImageCache` per source under `cache_dir` (`max_bytes` split evenly, at most `items_per_source` each).
    While a source's cache is below its cap, each round adds up to `fill_batch` rows; once full (or once a whole
    pass over a small dataset is cached), it takes `fill_batch` fresh rows every `refresh_interval_s` so the
    images miners see keep changing (oldest are evicted). `sample(rng)` -> (image, 0, metadata) or None.
    """

    def __init__(
        self,
        datasets: Sequence[DatasetSpec | str] | None = None,
        cache_dir: str | Path = "~/.bitmind/validator/real_cache",
        *,
        max_bytes: int = 10 * 1024**3,
        items_per_source: int = 1000,
        fill_batch: int = 8,
        max_side: int = 1024,
        image_format: str = "png",
        refresh_interval_s: float | None = 600.0,
        poll_s: float = 1.0,
        retry_base_s: float = 30.0,
        retry_max_s: float = 1800.0,
        log_interval_s: float = 60.0,
        seed: int | None = None,
    ) -> None:
        datasets = DEFAULT_REAL_DATASETS if datasets is None else datasets
        specs = [DatasetSpec.parse(d) if isinstance(d, str) else d for d in datasets]
        if not specs:
            raise ValueError("at least one real dataset is needed")
        ids = [spec.id for spec in specs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"real datasets must have distinct ids (last two path parts for local ones): {ids}")
        if image_format.lower() not in IMAGE_FORMATS:
            raise ValueError(f"unknown image format {image_format!r}; use one of {sorted(IMAGE_FORMATS)}")
        if items_per_source < 1 or fill_batch < 1 or max_side < 8 or max_bytes < len(specs):
            raise ValueError("items_per_source and fill_batch must be >= 1, max_side >= 8, max_bytes positive")
        if poll_s < 0 or retry_base_s < 0 or retry_max_s < retry_base_s:
            raise ValueError("poll_s and retry_base_s must be >= 0 and retry_max_s >= retry_base_s")
        self.cache_dir = Path(cache_dir).expanduser()
        self.fill_batch = fill_batch
        self.max_side = max_side
        self.image_format = image_format
        self.refresh_interval_s = refresh_interval_s
        self.poll_s = poll_s
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.log_interval_s = log_interval_s
        per_source_bytes = max_bytes // len(specs)
        self._states = [
            _SourceState(spec, ImageCache(self.cache_dir / spec.slug, per_source_bytes, items_per_source))
            for spec in specs
        ]
        self._seeds = np.random.default_rng(seed)
        self._round_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_log = time.monotonic()

    @property
    def specs(self) -> list[DatasetSpec]:
        return [state.spec for state in self._states]

    @property
    def caches(self) -> dict[str, ImageCache]:
        """Each source's cache, by source id."""
        return {state.spec.id: state.cache for state in self._states}

    def __len__(self) -> int:
        return sum(len(state.cache) for state in self._states)

    def counts(self) -> dict[str, int]:
        """Cached items per source id."""
        return {state.spec.id: len(state.cache) for state in self._states}

    def status(self) -> list[dict[str, Any]]:
        """Per source: cached items, items added this run, failures in a row, last error, bad rows skipped."""
        return [
            {
                "source": s.spec.id,
                "items": len(s.cache),
                "added": s.added,
                "failures": s.failures,
                "last_error": s.last_error,
                "bad_rows": s.bad_rows,
            }
            for s in self._states
        ]

    # ------------------------------------------------------------------ sampling
    def sample(self, rng: np.random.Generator) -> tuple[Image.Image, int, dict[str, Any]] | None:
        """(RGB image, label 0, metadata) from a uniformly chosen source with cached images; None if none has any."""
        for index in rng.permutation(len(self._states)):
            drawn = self._states[int(index)].cache.sample(rng)
            if drawn is not None:
                image, metadata = drawn
                return image, 0, metadata
        return None

    # ------------------------------------------------------------------ filling
    def fill_round(self) -> int:
        """One bounded round: at most `fill_batch` new images per source; returns how many were added.

        The background thread calls this every `poll_s`; it may also be called directly (tests, a one-off
        prefill). After `stop()` it does nothing until `start()`.
        """
        with self._round_lock:
            added = sum(self._fill_source(state) for state in self._states if not self._stop.is_set())
        self._maybe_log(added)
        return added

    def _fill_source(self, state: _SourceState) -> int:
        now = time.monotonic()
        if now < state.retry_at:
            return 0
        saturated = state.pass_complete or state.cache.is_full()
        if saturated and (self.refresh_interval_s is None or now - state.last_refresh < self.refresh_interval_s):
            return 0
        try:
            added = self._pull(state, self.fill_batch)
        except Exception as exc:  # a source must never take the filler down; it is retried with backoff
            state.failures += 1
            state.stream = None
            state.last_error = f"{type(exc).__name__}: {exc}"
            delay = min(self.retry_max_s, self.retry_base_s * 2 ** min(state.failures - 1, 30))
            state.retry_at = time.monotonic() + delay
            log.warning(
                "real source %s failed (%d in a row): %s; retrying in %.0f s",
                state.spec.id, state.failures, state.last_error, delay,
            )
            return 0
        if saturated:
            state.last_refresh = now
        if state.failures:
            log.info("real source %s recovered after %d failures", state.spec.id, state.failures)
            state.failures = 0
        state.added += added
        return added

    def _pull(self, state: _SourceState, wanted: int) -> int:
        added = scanned = 0
        while added < wanted and scanned < wanted * MAX_SCAN_PER_ITEM and not self._stop.is_set():
            if state.stream is None:
                state.stream_seed = int(self._seeds.integers(2**31))
                state.stream = enumerate(iter(state.spec.open_stream(state.stream_seed)))
                state.pass_added = 0
            try:
                position, row = next(state.stream)
            except StopIteration:
                state.stream = None
                if state.pass_added == 0:
                    raise ValueError(f"{state.spec.id}: a full pass found no usable rows") from None
                if not state.pass_complete:
                    log.info("real source %s: whole dataset cached (%d images)", state.spec.id, state.pass_added)
                state.pass_complete = True
                state.last_refresh = time.monotonic()
                break
            scanned += 1
            if state.spec.image_column not in row:
                columns = sorted(row)
                raise ValueError(f"{state.spec.id}: no column {state.spec.image_column!r}; columns are {columns}")
            if not state.spec.accepts(row):
                continue
            try:
                image = decode_row_image(row.get(state.spec.image_column), self.max_side)
            except (ValueError, OSError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
                state.bad_rows += 1
                log.warning("real source %s: skipping row %d: %s", state.spec.id, position, exc)
                continue
            state.cache.put(image, self._metadata(state, position, row, image), fmt=self.image_format)
            added += 1
            state.pass_added += 1
        return added

    def _metadata(self, state: _SourceState, position: int, row: dict[str, Any], image: Image.Image) -> dict[str, Any]:
        spec = state.spec
        return {
            "source_type": "real",
            "source": spec.id,
            "dataset": spec.path,
            "config": spec.name,
            "split": spec.split if spec.is_hub else "train",
            "row": position,
            "stream_seed": state.stream_seed if spec.shuffle_buffer else None,
            "shuffle_buffer": spec.shuffle_buffer,
            "stored_size": [image.width, image.height],
            "fields": _scalar_fields(row, skip=spec.image_column),
        }

    def _maybe_log(self, added: int) -> None:
        now = time.monotonic()
        if added and now - self._last_log >= self.log_interval_s:
            self._last_log = now
            counts = ", ".join(f"{source} {n}" for source, n in self.counts().items())
            log.info("real-image cache: %d items (%s)", len(self), counts)

    # ------------------------------------------------------------------ background thread
    def start(self) -> None:
        """Start the background filler (a daemon thread); a no-op when it is already running."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="real-image-fill", daemon=True)
        self._thread.start()
        log.info("real-image filler started: %d sources, cache %s", len(self._states), self.cache_dir)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.fill_round()
            except Exception:  # belt and braces: _fill_source already contains source failures
                log.exception("real-image fill round failed")
            self._stop.wait(self.poll_s)

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the filler to stop and wait up to `timeout` s; True when it has stopped."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("real-image filler still busy after %.0f s (a slow source); it is a daemon thread", timeout)
            return False
        self._thread = None
        for state in self._states:
            state.stream = None
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "RealImageSource":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


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
