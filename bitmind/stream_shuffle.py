"""One way to shuffle a `datasets` stream: through a buffer, interleaving no more shards than the stream has.

Why: `IterableDataset.shuffle` fills its buffer from up to `max_buffer_input_shards` shards at once (10 by default),
read by a pool of threads, and an iterator of such a stream sleeps 5 s in its clean-up whenever it ends or is
dropped (datasets' guard against an Arrow crash when parquet reader threads shut down). A one-shard stream gains
nothing from interleaving and would still pay that sleep; a dropped iterator pays it wherever the garbage collector
happens to run, stalling unrelated code for seconds.
"""

import inspect
from typing import Any

__all__ = ["shuffle_stream"]


def shuffle_stream(stream: Any, seed: int, buffer_size: int, max_shards: int = 10) -> Any:
    """`stream.shuffle(seed, buffer_size)` filling the buffer from at most `max_shards` shards at a time, and never
    from more than the stream holds (shard order is shuffled either way)."""
    if max_shards < 1:
        raise ValueError(f"max_shards must be at least 1, got {max_shards}")
    options: dict[str, Any] = {}
    if "max_buffer_input_shards" in inspect.signature(stream.shuffle).parameters:  # older datasets: one at a time
        options["max_buffer_input_shards"] = min(max_shards, getattr(stream, "num_shards", None) or 1)
    return stream.shuffle(seed=seed, buffer_size=buffer_size, **options)
