"""Training data read as a stream (`bitmind-train --streaming`): hub datasets of any size are read shard by shard
with `datasets` streaming and never stored whole on disk.

Every training spec is opened with `load_dataset(..., streaming=True)` — the code path of a hub id, used for local
parquet too — and normalised to the shared columns on the fly. Each process reads its own part of every stream
(`datasets.distributed.split_dataset_by_node`: whole shards when their number divides the world size, else every
world-th row), shuffled through a buffer of `shuffle_buffer` rows and reshuffled every epoch. The datasets are
balanced as in the map-style trainer, one dataset after another drawn uniformly; give real and generated rows of
a mixed dataset as two specs (`X?label=0`, `X?label=1`) to balance labels too. A stream that runs out starts over.

Determinism: for one seed and one world size a run is reproduced exactly. A resumed run continues every stream
where its process stopped (datasets' stream state), but the shuffle buffer refills, so the rows after a resume
are not exactly the uninterrupted run's; on another world size the streams start over. Streams cannot be indexed,
so the `(seed, epoch, sample)` plan of the map-style trainer does not apply (sample `k` is still augmented from
`(seed, epoch, k)`).
"""

import logging
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from base_miner.training.data import (
    COLUMNS,
    DataError,
    DatasetSpec,
    Selector,
    _declared_label,
    _parquet_files,
    _row_matches,
)
from bitmind.hub_id import is_hub_id

__all__ = ["StreamReader", "StreamSamples", "method_index", "open_stream", "process_part", "select_stream"]

log = logging.getLogger(__name__)


def open_stream(spec: DatasetSpec):
    """The spec's rows as a `datasets.IterableDataset` with `COLUMNS` (image left undecoded)."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    if "[" in spec.split:
        raise DataError(f"dataset {spec.name!r}: a stream reads whole splits; drop the slice in {spec.split!r}")
    if spec.frames:
        raise DataError(f"dataset {spec.name!r}: frames= is read without --streaming (clips become frames at load)")
    path = Path(spec.location).expanduser()
    if path.exists():
        files = _parquet_files(path)
        if not files:
            raise DataError(f"{str(path)!r}: --streaming reads parquet files/folders and hub datasets")
        source, options = "parquet", {"data_files": files}
    elif is_hub_id(spec.location):
        source, options = spec.location, {}
    else:
        raise DataError(f"dataset {spec.location!r} does not exist (and is not a hub id 'org/name')")
    try:
        ds = load_dataset(source, split=spec.split, streaming=True, **options)
    except Exception as exc:  # datasets raises many types (FileNotFound, hub, split names); all mean "no rows"
        reason = f"{type(exc).__name__}: {exc}"
        raise DataError(f"cannot stream dataset {spec.location!r} split {spec.split!r}: {reason}") from exc
    columns = set(ds.column_names or ())
    declared = _declared_label(spec)
    missing = {"image", "label"} - columns - ({"label"} if declared is not None else set())
    if missing:
        raise DataError(f"dataset {spec.name!r} lacks the column(s) {sorted(missing)} (has {sorted(columns)})")
    ds = ds.cast_column("image", ImageFeature(decode=False))
    fill = {"source": spec.name, "generator": ""}
    if "label" not in columns:
        fill["label"] = declared
    if missing_fill := {key: value for key, value in fill.items() if key not in columns}:
        ds = ds.map(lambda row: missing_fill)
    ds = ds.select_columns(list(COLUMNS))
    if spec.selectors and "label" in columns:
        ds = select_stream(ds, spec.selectors)
    return ds


def select_stream(stream, selectors: Sequence[Selector], keep_matching: bool = True):
    """`data.select` for a stream: the rows that match any selector (or, with `keep_matching=False`, none)."""
    return stream.filter(
        lambda r: _row_matches(selectors, r["source"] or "", r["generator"] or "", int(r["label"])) == keep_matching
    )


def process_part(ds, rank: int, world: int):
    """Process `rank`'s part of a stream: whole shards when their number divides `world`, else every world-th row."""
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 else ds


def method_index(generator: str, label: int, classes: int) -> int:
    """UCF's method label for a streamed row: 0 real, else a stable hash of the generator folded onto the fake
    classes (a stream's generators are not known in advance)."""
    if label != 1:
        return 0
    return 1 + zlib.crc32((generator or "").encode()) % max(1, classes - 1)


class StreamReader:
    """Endless balanced rows from this process's streams: each row from a dataset drawn uniformly (seeded by
    `(seed, rank)`); a stream that ends starts over reshuffled, one that holds nothing is an error.

    The reader lives as long as the run, so epochs continue the streams instead of reopening them; `state()` and
    `state=` carry its position (datasets' own stream state: shard and row; the shuffle buffer refills) over a resume.
    """

    def __init__(self, streams: list[tuple[str, object]], seed: int, rank: int, state: dict | None = None) -> None:
        self.streams, self.rank = streams, rank
        self.chooser = np.random.default_rng([seed, rank])
        self.passes = [0] * len(streams)
        self.iterators: list[Iterator | None] = [None] * len(streams)
        self._fresh: list[dict | None] = [None] * len(streams)  # a resumed stream's start, should its position not fit
        if state is not None and len(state["streams"]) != len(streams):
            log.warning("the streams start over: the state holds positions of %d stream(s), this run reads %d",
                        len(state["streams"]), len(streams))  # fmt: skip
        elif state is not None:
            self.chooser.bit_generator.state = state["chooser"]
            self.passes = list(state["passes"])
            for index, ((_, stream), stream_state) in enumerate(zip(streams, state["streams"])):
                self._fresh[index] = stream.state_dict()
                stream.load_state_dict(stream_state)

    def state(self) -> dict:
        return {"chooser": self.chooser.bit_generator.state, "passes": list(self.passes),
                "streams": [stream.state_dict() for _, stream in self.streams]}  # fmt: skip

    def next_row(self) -> dict:
        index = int(self.chooser.integers(len(self.streams)))
        name, stream = self.streams[index]
        for _ in range(2):
            row = self._read(index, name, stream)
            if row is not None:
                return row
            self.iterators[index] = None
            self.passes[index] += 1
        raise DataError(f"process {self.rank} read no row of {name!r}: its part of the stream is empty")

    def _read(self, index: int, name: str, stream) -> dict | None:  # noqa: ANN001 - datasets.IterableDataset
        """The stream's next row, None at its end. datasets only reads a loaded position when iteration starts, so a
        position saved by another version of datasets (or of this reader) fails here: it is dropped with a warning
        and the stream starts over, as a state without positions does."""
        if self.iterators[index] is None:
            stream.set_epoch(self.passes[index])
            self.iterators[index] = iter(stream)
        try:
            row = next(self.iterators[index], None)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            if self._fresh[index] is None:
                raise
            log.warning("the stream %r starts over: its saved position does not fit it (%s: %s)", name,
                        type(exc).__name__, exc)  # fmt: skip
            stream.load_state_dict(self._fresh[index])
            self.iterators[index] = iter(stream)
            row = next(self.iterators[index], None)
        self._fresh[index] = None
        return row


class StreamSamples(torch.utils.data.IterableDataset):
    """This process's samples of one epoch: the reader's next `len(positions)` rows, each made a training sample
    with the rng of its plan position `(seed, epoch, position)`."""

    def __init__(self, trainer, reader: StreamReader, epoch: int, positions: np.ndarray) -> None:
        self.trainer, self.reader, self.epoch, self.positions = trainer, reader, epoch, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self):
        seed = self.trainer.config.seed
        for position in self.positions:
            row = self.reader.next_row()
            yield self.trainer.stream_sample(row, np.random.default_rng([seed, self.epoch, int(position)]))
