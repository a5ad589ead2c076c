"""Real challenge images: `datasets`-backed sources filling a size-capped local cache in the background.

A daemon thread pulls a bounded batch of rows per source per round into one `ImageCache` per source; a failing
source is logged and retried later with exponential back-off (`bitmind.backoff`) while the others keep working.
Sampling picks a source uniformly (among sources with cached images), then an item uniformly, so a huge dataset
does not drown a small one. With nothing cached yet `sample` returns None. Where rows come from and how they are
streamed is `validator.challenges.dataset_spec`; each row's image is decoded by the codec (`bitmind.image_codec`).

A row's identity in the metadata is (dataset, split, stream_seed, row): `row` is the row's position in the stream
shuffled with `stream_seed`, counted before the label filter; non-image scalar columns of the row are copied into
`fields`.
"""

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bitmind.backoff import Backoff
from bitmind.image_codec import DecodeLimits, ImageDecodeError, decode_cell
from validator.challenges.cache import FORMATS as IMAGE_FORMATS
from validator.challenges.cache import ImageCache
from validator.challenges.dataset_spec import DEFAULT_REAL_DATASETS, DatasetSpec

__all__ = ["RealImageSource", "decode_row_image"]

log = logging.getLogger(__name__)

MAX_FIELD_CHARS = 200
# Rows scanned per wanted item before a round gives up (bounds a round when a label filter rejects most rows).
MAX_SCAN_PER_ITEM = 50


def decode_row_image(value: Any, max_side: int, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """A real row's image cell as the validator uses it: RGB, no larger than `max_side` (a big JPEG decodes at a
    reduced scale), within `limits`; `ImageDecodeError` when unusable."""
    return decode_cell(value, limits, max_side)


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
    backoff: Backoff
    stream: Iterator[tuple[int, dict[str, Any]]] | None = None
    stream_seed: int = 0
    pass_added: int = 0
    pass_complete: bool = False
    last_refresh: float = float("-inf")
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
        self.log_interval_s = log_interval_s
        per_source_bytes = max_bytes // len(specs)
        self._states = [
            _SourceState(spec, self._new_cache(self.cache_dir / spec.slug, per_source_bytes, items_per_source),
                         Backoff(retry_base_s, retry_max_s))
            for spec in specs
        ]
        self._seeds = np.random.default_rng(seed)
        self._round_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_log = time.monotonic()

    @staticmethod
    def _new_cache(root: Path, max_bytes: int, max_items: int) -> ImageCache:
        """One source's cache (a subclass caching other media overrides this)."""
        return ImageCache(root, max_bytes, max_items)

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
                "failures": s.backoff.failures,
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
        if not state.backoff.ready():
            return 0
        now = time.monotonic()
        try:
            saturated = state.pass_complete or state.cache.is_full()
            if saturated and (self.refresh_interval_s is None or now - state.last_refresh < self.refresh_interval_s):
                return 0
            added = self._pull(state, self.fill_batch)
        except Exception as exc:  # a source must never take the filler down; it is retried with backoff
            state.stream = None
            state.last_error = f"{type(exc).__name__}: {exc}"
            delay = state.backoff.failed()
            log.warning(
                "real source %s failed (%d in a row): %s; retrying in %.0f s",
                state.spec.id, state.backoff.failures, state.last_error, delay,
            )
            return 0
        if saturated:
            state.last_refresh = now
        recovered_after = state.backoff.succeeded()
        if recovered_after:
            log.info("real source %s recovered after %d failures", state.spec.id, recovered_after)
        state.added += added
        return added

    def _pull(self, state: _SourceState, wanted: int) -> int:
        added = scanned = 0
        while added < wanted and scanned < wanted * MAX_SCAN_PER_ITEM and not self._stop.is_set():
            if state.stream is None:
                state.stream_seed = int(self._seeds.integers(2**31))
                state.stream = enumerate(iter(self._open_stream(state)))
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
            if self._ingest(state, position, row):
                added += 1
                state.pass_added += 1
        return added

    def _open_stream(self, state: _SourceState) -> Iterable[dict[str, Any]]:
        """The rows of a source's next pass, shuffled with `state.stream_seed`."""
        return state.spec.open_stream(state.stream_seed)

    def _ingest(self, state: _SourceState, position: int, row: dict[str, Any]) -> bool:
        """Decode one row into the source's cache; False (logged, counted) for a row that is filtered out or bad."""
        if state.spec.image_column not in row:
            columns = sorted(row)
            raise ValueError(f"{state.spec.id}: no column {state.spec.image_column!r}; columns are {columns}")
        if not state.spec.accepts(row):
            return False
        try:
            image = decode_row_image(row.get(state.spec.image_column), self.max_side)
        except ImageDecodeError as exc:
            state.bad_rows += 1
            log.warning("real source %s: skipping row %d: %s", state.spec.id, position, exc)
            return False
        state.cache.put(image, self._metadata(state, position, row, image), fmt=self.image_format)
        return True

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
