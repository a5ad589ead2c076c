"""`bitmind-train --streaming`: local parquet read through `load_dataset(..., streaming=True)` (the code path of a
hub id), split per process, shuffled through a buffer, reproducible and resumable; bad input fails clearly."""

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from base_miner.registry import ConfigError
from base_miner.training.data import COLUMNS, DatasetSpec
from base_miner.training.streaming import method_index, open_stream, process_part
from base_miner.training.trainer import STATE_FILE, TrainConfig, Trainer
from tests._required import shared_data


@pytest.fixture(scope="module")
def cifake_mini() -> Path:
    return shared_data("cifake-mini/train.parquet")


def _config(cifake_mini: Path, out: Path, **keys) -> TrainConfig:
    base = dict(detector="tiny_cnn", overrides={"image_size": 32, "width": 8, "weights": None},
                train=[f"{cifake_mini}?label=0", f"{cifake_mini}?label=1"], streaming=True, shuffle_buffer=64,
                epochs=2, samples_per_epoch=16, batch_size=8, lr=1e-3, warmup=0.0, augment=0.5, threads=1, seed=1,
                out=str(out), device="cpu", save_every=1)  # fmt: skip
    return TrainConfig(**{**base, **keys})


def test_a_stream_has_the_shared_columns_and_applies_selectors(cifake_mini):
    rows = list(open_stream(DatasetSpec.parse(f"{cifake_mini}?label=1")).take(20))
    assert len(rows) == 20 and all(set(row) == set(COLUMNS) for row in rows)
    assert {row["label"] for row in rows} == {1}
    assert isinstance(rows[0]["image"]["bytes"], bytes)  # left undecoded, as the map-style rows
    assert method_index("sd-1.4", 1, 3) in (1, 2) and method_index("", 0, 3) == 0


def test_each_process_reads_its_own_part_of_a_stream(tmp_path):
    ids = [f"row{i}" for i in range(10)]
    pq.write_table(pa.table({"image": [{"bytes": b"x", "path": None}] * 10, "label": [0] * 10, "source": ids,
                             "generator": [""] * 10}), tmp_path / "d.parquet")  # fmt: skip
    stream = open_stream(DatasetSpec.parse(str(tmp_path / "d.parquet")))
    parts = [[row["source"] for row in process_part(stream, rank, 2)] for rank in (0, 1)]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(ids)


def test_streamed_training_is_reproducible_and_resumes_where_it_stopped(cifake_mini, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    runs = []
    for name in ("a", "b"):  # one after the other: dropout draws from torch's global generator
        runs.append(Trainer(_config(cifake_mini, tmp_path / name)))
        runs[-1].fit()
    assert runs[0].step == 4 and runs[0].losses == runs[1].losses  # same seed, same rows, same updates
    assert "images/s in total (per process:" in caplog.text

    interrupted = Trainer(_config(cifake_mini, tmp_path / "c", max_steps=3))
    interrupted.fit()
    state = torch.load(tmp_path / "c" / STATE_FILE, weights_only=True)
    assert len(state["streams"]) == 1  # one process: its stream positions
    resumed = Trainer(_config(cifake_mini, tmp_path / "c", resume=True))
    assert resumed.step == 3 and resumed.losses == runs[0].losses[:3]
    resumed.fit()
    assert resumed.step == 4 and "streams start over" not in caplog.text

    del state["streams"]  # a state saved on interruption: no position, the streams start over with a warning
    torch.save(state, tmp_path / "c" / STATE_FILE)
    Trainer(_config(cifake_mini, tmp_path / "c", resume=True))
    assert "the streams start over" in caplog.text


def test_a_saved_stream_position_another_version_made_starts_that_stream_over(cifake_mini, tmp_path, caplog):
    """Stream positions are datasets' own state, whose layout changes with datasets and with how the stream is
    shuffled (a one-shard stream saved before `bitmind.stream_shuffle` held an interleaving layer). datasets reads a
    loaded position only when iteration starts: the resumed run must start such a stream over with a warning
    instead of stopping with datasets' KeyError."""
    caplog.set_level(logging.INFO)
    reference = Trainer(_config(cifake_mini, tmp_path / "ref"))
    reference.fit()
    run = tmp_path / "old"
    Trainer(_config(cifake_mini, run, max_steps=3)).fit()
    state = torch.load(run / STATE_FILE, weights_only=True)
    positions = state["streams"][0]["streams"]
    for index, text in enumerate(_config(cifake_mini, run).train):  # as the previous release shuffled them
        old = open_stream(DatasetSpec.parse(text)).shuffle(seed=1, buffer_size=64, max_buffer_input_shards=10)
        positions[index] = old.state_dict()
    torch.save(state, run / STATE_FILE)

    resumed = Trainer(_config(cifake_mini, run, resume=True))
    assert resumed.step == 3
    resumed.fit()
    assert resumed.step == 4 and len(resumed.losses) == 4
    assert resumed.losses[:3] == reference.losses[:3]  # the steps before the interruption are kept
    assert caplog.text.count("starts over: its saved position does not fit it (KeyError") == 2


def test_a_state_with_positions_of_other_streams_starts_them_all_over(cifake_mini, tmp_path, caplog):
    """Resumed with another list of streams (the same plan of steps): the saved positions belong to other streams,
    so every stream starts over with a warning (before, the third stream had no pass count and stopped the run)."""
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    Trainer(_config(cifake_mini, run, max_steps=3)).fit()
    streams = [f"{cifake_mini}?label=0", f"{cifake_mini}?label=1", f"{cifake_mini}?label=1"]
    resumed = Trainer(_config(cifake_mini, run, resume=True, train=streams))
    resumed.fit()
    assert resumed.step == 4
    assert "the streams start over: the state holds positions of 2 stream(s), this run reads 3" in caplog.text


@pytest.mark.parametrize(
    ("keys", "error", "message"),
    [
        ({"samples_per_epoch": None}, ConfigError, "needs --samples-per-epoch"),
        ({"holdout": ["source=x"]}, ConfigError, "does not work with --holdout"),
        ({"train": ["{data}:train[:50%]"]}, ConfigError, "a stream reads whole splits"),
        ({"train": ["{data}?source=no-such-source"]}, ConfigError, "process 0: DataError: its part of"),
        ({"train": ["no/such-dataset-here-x"]}, ConfigError, "cannot stream dataset"),
    ],
)
def test_bad_streaming_input_is_a_clear_error(cifake_mini, tmp_path, keys, error, message):
    if "train" in keys:
        keys = {**keys, "train": [text.format(data=cifake_mini) for text in keys["train"]]}
    with pytest.raises(error, match=message.replace("[", r"\[")):
        Trainer(_config(cifake_mini, tmp_path, **keys))
