"""`bitmind.stream_shuffle`: the one buffered shuffle of `datasets` streams (validator real sources, streamed
training, streamed probe samples). A stream is interleaved across no more shards than it has: a one-shard stream
starts no reader threads (whose clean-up sleeps 5 s whenever an iterator ends or is dropped, even inside the
garbage collector), while a stream of several shards still fills its buffer from all of them."""

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from bitmind.stream_shuffle import shuffle_stream


def _shards(folder, count: int, rows: int) -> list[str]:
    paths = []
    for shard in range(count):
        path = folder / f"shard{shard}.parquet"
        pq.write_table(pa.table({"id": [f"{shard}-{row}" for row in range(rows)]}), path)
        paths.append(str(path))
    return paths


def _read(stream, limit: int | None = None) -> tuple[list[str], set[str]]:
    """The ids read (all, or the first `limit`), and the names of the threads seen alive while reading."""
    ids, threads = [], set()
    iterator = iter(stream)
    for row in iterator:
        ids.append(row["id"])
        threads |= {thread.name for thread in threading.enumerate()}
        if limit is not None and len(ids) == limit:
            break
    iterator.close()
    return ids, threads


def _stream(paths: list[str]):
    return load_dataset("parquet", data_files=paths, split="train", streaming=True)


def test_a_one_shard_stream_is_shuffled_without_reader_threads(tmp_path):
    paths = _shards(tmp_path, 1, 120)
    before = {thread.name for thread in threading.enumerate()}
    ids, threads = _read(shuffle_stream(_stream(paths), seed=3, buffer_size=16))
    assert sorted(ids) == sorted(f"0-{row}" for row in range(120)) and ids != sorted(ids, key=lambda i: int(i[2:]))
    assert not {name for name in threads - before if name.startswith("ThreadPoolExecutor")}
    assert _read(shuffle_stream(_stream(paths), seed=3, buffer_size=16))[0] == ids  # the seed fixes the order


def test_a_stream_of_several_shards_fills_its_buffer_from_all_of_them(tmp_path):
    paths = _shards(tmp_path, 2, 100)
    first, threads = _read(shuffle_stream(_stream(paths), seed=0, buffer_size=16), limit=20)
    assert {row.split("-")[0] for row in first} == {"0", "1"}
    # The guard of the test above can fail: an interleaved stream does read through a pool of threads.
    assert any(name.startswith("ThreadPoolExecutor") for name in threads)
    # The validator's sources read one shard at a time: the first rows all come from one shard.
    one_at_a_time, _ = _read(shuffle_stream(_stream(paths), seed=0, buffer_size=16, max_shards=1), limit=20)
    assert len({row.split("-")[0] for row in one_at_a_time}) == 1


@pytest.mark.parametrize("max_shards", [0, -3])
def test_a_shard_limit_under_one_is_refused(tmp_path, max_shards):
    with pytest.raises(ValueError, match="max_shards must be at least 1"):
        shuffle_stream(_stream(_shards(tmp_path, 1, 4)), seed=1, buffer_size=8, max_shards=max_shards)
