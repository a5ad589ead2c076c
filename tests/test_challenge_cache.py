"""ImageCache: atomic items, broken-item handling, oldest-first eviction, a writer process beside a reader;
plus the synthetic source and the challenge sampler that read from it."""

import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests._killed_writer import kill_a_writer_of
from validator.augment import Augmenter
from validator.challenges.cache import ImageCache
from validator.challenges.sampler import ChallengeSampler
from validator.challenges.synthetic import SyntheticImageSource


def solid(value: int, size: int = 16, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).convert(mode)


def noisy(seed: int, size: int = 32) -> Image.Image:
    """Incompressible content, so every item has about the same size on disk."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_put_then_sample_round_trips_image_and_metadata(tmp_path):
    cache = ImageCache(tmp_path)
    image = noisy(1)
    path = cache.put(image, {"prompt": "a cat", "seed": np.int64(7), "args": {"steps": 20}})
    assert path.exists() and path.suffix == ".png"
    assert len(cache) == 1
    drawn = cache.sample(np.random.default_rng(0))
    assert drawn is not None
    out, metadata = drawn
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(image))  # PNG is lossless
    assert metadata["prompt"] == "a cat" and metadata["seed"] == 7 and metadata["args"] == {"steps": 20}
    assert metadata["cache_item"] == path.stem


def test_sidecars_are_strict_json_whatever_the_metadata_holds(tmp_path):
    cache = ImageCache(tmp_path)
    metadata = {"score": float("nan"), "peak": np.float32("inf"), "seed": np.int64(3), "vec": np.arange(2),
                "where": tmp_path, "pair": (1, 2), "flag": np.bool_(True)}
    path = cache.put(solid(10), metadata)

    def no_constants(name):
        raise AssertionError(f"sidecar holds {name}, which is not JSON")

    sidecar = json.loads(path.with_suffix(".json").read_text(), parse_constant=no_constants)
    assert sidecar["metadata"] == {"score": None, "peak": None, "seed": 3, "vec": [0, 1], "where": str(tmp_path),
                                   "pair": [1, 2], "flag": True}


def test_a_cached_image_replaced_by_a_pixel_bomb_is_refused_and_removed(tmp_path, caplog):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    cache = ImageCache(tmp_path)
    path = cache.put(solid(10), {})
    side = 9000  # 81 M pixels in a few hundred KB, over the cache's read limit
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (side + 1) * side, 9)) + chunk(b"IEND", b""))
    path.write_bytes(bomb)
    with caplog.at_level(logging.WARNING, logger="validator.challenges.cache"):
        assert cache.sample(np.random.default_rng(0)) is None
    assert "more than the limit" in caplog.text and not path.exists()


def test_put_converts_to_rgb_and_writes_jpeg(tmp_path):
    cache = ImageCache(tmp_path)
    path = cache.put(solid(100, mode="RGBA"), {}, fmt="jpeg")
    assert path.suffix == ".jpg"
    image, _ = cache.sample(np.random.default_rng(0))
    assert image.mode == "RGB"


@pytest.mark.parametrize(
    "image, metadata, fmt, message",
    [
        ("not an image", {}, "png", "PIL image"),
        (None, {}, "png", "PIL image"),
        (solid(1), ["not", "a", "dict"], "png", "dict"),
        (solid(1), {"x": object()}, "png", "JSON"),
        (solid(1), {}, "gif", "unknown image format"),
    ],
)
def test_put_rejects_bad_input_without_writing(tmp_path, image, metadata, fmt, message):
    cache = ImageCache(tmp_path)
    with pytest.raises((TypeError, ValueError), match=message):
        cache.put(image, metadata, fmt=fmt)
    assert list(tmp_path.iterdir()) == []


def test_item_larger_than_the_cap_is_rejected(tmp_path):
    cache = ImageCache(tmp_path, max_bytes=1000)
    with pytest.raises(ValueError, match="larger than the cache cap"):
        cache.put(noisy(0, size=64), {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [{"max_bytes": 0}, {"max_bytes": -5}, {"max_items": 0}])
def test_invalid_caps_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        ImageCache(tmp_path, **kwargs)


def test_item_without_sidecar_is_invisible(tmp_path):
    cache = ImageCache(tmp_path)
    solid(9).save(tmp_path / "00000000000000000001-abc.png")  # a writer stopped before the sidecar
    (tmp_path / ".tmp-half-written").write_bytes(b"\x89PNG partial")
    assert len(cache) == 0
    assert cache.items() == []
    assert cache.sample(np.random.default_rng(0)) is None


def test_stale_orphans_are_swept_but_fresh_ones_kept(tmp_path, monkeypatch):
    cache = ImageCache(tmp_path)
    old_orphan = tmp_path / "00000000000000000001-old.png"
    old_temp = kill_a_writer_of(tmp_path / "00000000000000000003-crashed.png")
    fresh_orphan = tmp_path / "00000000000000000002-new.png"
    for path in (old_orphan, fresh_orphan):
        path.write_bytes(b"x")
    long_ago = time.time() - 3600
    os.utime(old_orphan, (long_ago, long_ago))
    os.utime(old_temp, (long_ago, long_ago))
    cache.put(solid(1), {})
    assert not old_orphan.exists() and not old_temp.exists()
    assert fresh_orphan.exists()  # may belong to a writer that is mid-put
    assert len(cache) == 1


def _broken_sidecar(root: Path, stem: str, content: bytes) -> None:
    (root / f"{stem}.json").write_bytes(content)


@pytest.mark.parametrize(
    "breakage",
    ["corrupt_json", "missing_fields", "path_escape", "missing_image", "corrupt_image"],
)
def test_broken_item_is_skipped_removed_and_logged(tmp_path, caplog, breakage):
    cache = ImageCache(tmp_path)
    good = cache.put(solid(200), {"name": "good"})
    stem = "00000000000000000001-broken"
    if breakage == "corrupt_json":
        (tmp_path / f"{stem}.png").write_bytes(good.read_bytes())
        _broken_sidecar(tmp_path, stem, b'{"image": "x.png", "metad')
    elif breakage == "missing_fields":
        _broken_sidecar(tmp_path, stem, b'{"hello": 1}')
    elif breakage == "path_escape":
        _broken_sidecar(tmp_path, stem, json.dumps({"image": f"../{good.name}", "metadata": {}}).encode())
    elif breakage == "missing_image":
        _broken_sidecar(tmp_path, stem, json.dumps({"image": f"{stem}.png", "metadata": {}}).encode())
    else:
        (tmp_path / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
        _broken_sidecar(tmp_path, stem, json.dumps({"image": f"{stem}.png", "metadata": {}}).encode())
    assert len(cache) == 2
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING, logger="validator.challenges.cache"):
        names = {cache.sample(rng)[1]["name"] for _ in range(10)}
    assert names == {"good"}
    assert len(cache) == 1
    assert not (tmp_path / f"{stem}.json").exists() and not (tmp_path / f"{stem}.png").exists()
    assert good.exists()  # a sidecar pointing elsewhere must not delete another item's image
    messages = [record.getMessage() for record in caplog.records]
    assert any("removing broken item" in message and stem in message for message in messages)


def test_discard_removes_one_item_and_refuses_what_is_not_an_item_stem(tmp_path, caplog):
    """The public hook a layer on top (the clip cache) removes its broken items with: the named item goes, with
    its mask, and a stem that is a path, '..' or a hidden name removes nothing, outside the folder or inside."""
    root = tmp_path / "cache"
    cache = ImageCache(root)
    keep = cache.put(solid(10), {"name": "keep"})
    gone = cache.put(solid(20), {"name": "gone"}, mask=np.ones((16, 16), np.float32))
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    with caplog.at_level(logging.WARNING, logger="validator.challenges.cache"):
        for hostile in ("../outside", str(outside.with_suffix("")), "..", ".writers", "", "a\x00b", None):
            assert cache.discard(hostile, "hostile") is False
        assert outside.exists() and len(cache) == 2
        assert cache.discard(gone.stem, "sheet does not parse") is True
    assert [item.stem for item in cache.items()] == [keep.stem] and keep.exists()
    assert not any(path.name.startswith(gone.stem) for path in root.iterdir())  # image, sidecar and mask
    assert "not an item stem" in caplog.text and f"removing broken item {gone.stem}: sheet does not parse" in caplog.text
    assert cache.discard(gone.stem, "already gone") is True and len(cache) == 1  # a vanished item is no error


def test_only_broken_items_gives_none(tmp_path):
    cache = ImageCache(tmp_path)
    for i in range(3):
        _broken_sidecar(tmp_path, f"0000000000000000000{i}-bad", b"not json")
    assert cache.sample(np.random.default_rng(0)) is None
    assert len(cache) == 0


def test_eviction_is_oldest_first_under_the_byte_cap(tmp_path):
    probe = ImageCache(tmp_path / "probe")
    probe.put(noisy(0), {"i": 0})
    item_bytes = probe.total_bytes()
    cache = ImageCache(tmp_path / "cache", max_bytes=int(item_bytes * 3.5))
    for i in range(10):
        cache.put(noisy(i), {"i": i})
        assert cache.total_bytes() <= cache.max_bytes
    kept = [json.loads(item.sidecar_path.read_text())["metadata"]["i"] for item in cache.items()]
    assert kept == [7, 8, 9]
    assert len(list((tmp_path / "cache").glob("*.png"))) == 3  # evicted images are gone too
    assert cache.is_full()


def test_eviction_respects_max_items(tmp_path):
    cache = ImageCache(tmp_path, max_items=4)
    for i in range(7):
        cache.put(solid(i), {"i": i})
    kept = [json.loads(item.sidecar_path.read_text())["metadata"]["i"] for item in cache.items()]
    assert kept == [3, 4, 5, 6]
    assert cache.is_full()


def test_sample_is_uniform_over_items(tmp_path):
    cache = ImageCache(tmp_path)
    for i in range(4):
        cache.put(solid(i), {"i": i})
    rng = np.random.default_rng(1)
    counts = np.bincount([cache.sample(rng)[1]["i"] for _ in range(800)], minlength=4)
    assert counts.min() > 140 and counts.max() < 260  # expected 200 each


def _writer(root: str, count: int) -> None:
    cache = ImageCache(root, max_items=5)
    for i in range(count):
        value = (i * 37) % 256
        cache.put(Image.fromarray(np.full((48, 48, 3), value, dtype=np.uint8)), {"value": value, "i": i})


def test_writer_process_and_reader_run_concurrently(tmp_path, caplog):
    context = multiprocessing.get_context("spawn")
    writer = context.Process(target=_writer, args=(str(tmp_path), 150))
    reader_cache = ImageCache(tmp_path)
    rng = np.random.default_rng(0)
    seen = 0
    with caplog.at_level(logging.WARNING, logger="validator.challenges.cache"):
        writer.start()
        deadline = time.monotonic() + 120
        while writer.is_alive() and time.monotonic() < deadline:
            drawn = reader_cache.sample(rng)
            if drawn is None:
                time.sleep(0.001)
                continue
            image, metadata = drawn
            # A complete item: the image matches its own sidecar.
            assert np.all(np.asarray(image) == metadata["value"])
            seen += 1
        writer.join(timeout=60)
    assert writer.exitcode == 0
    assert seen > 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no half-written item ever seen
    assert len(reader_cache) == 5
    assert [json.loads(item.sidecar_path.read_text())["metadata"]["i"] for item in reader_cache.items()] == list(
        range(145, 150)
    )


# ---------------------------------------------------------------- synthetic source + sampler


class _FixedReal:
    def __init__(self, available: bool = True):
        self.available = available

    def __len__(self) -> int:
        return int(self.available)

    def sample(self, rng):
        if not self.available:
            return None
        return Image.fromarray(np.full((300, 400, 3), 50, dtype=np.uint8)), 0, {"source_type": "real", "source": "x"}


def test_synthetic_source_labels_items_one_and_keeps_generator_metadata(tmp_path):
    writer = ImageCache(tmp_path, max_bytes=10**8)
    source = SyntheticImageSource(tmp_path)
    assert source.sample(np.random.default_rng(0)) is None
    writer.put(noisy(3), {"prompt": "p", "model": "m", "seed": 1})
    image, label, metadata = source.sample(np.random.default_rng(0))
    assert label == 1 and image.size == (32, 32)
    assert metadata["source_type"] == "synthetic" and metadata["model"] == "m" and metadata["prompt"] == "p"


def test_sampler_falls_back_to_real_when_no_synthetic_image(tmp_path, caplog):
    sampler = ChallengeSampler(_FixedReal(), SyntheticImageSource(tmp_path), Augmenter({1: 1.0}), fake_probability=1.0)
    with caplog.at_level(logging.WARNING, logger="validator.challenges.sampler"):
        challenge = sampler.sample(np.random.default_rng(0))
    assert challenge.label == 0 and challenge.metadata["source_type"] == "real"
    assert challenge.image.size == (256, 256)
    assert challenge.metadata["augmentation"]["level"] == 1
    assert any("no synthetic image" in r.getMessage() for r in caplog.records)


def test_sampler_mixes_real_and_fake_and_gives_none_without_real(tmp_path):
    ImageCache(tmp_path).put(noisy(4), {"model": "m"})
    sampler = ChallengeSampler(_FixedReal(), SyntheticImageSource(tmp_path), fake_probability=0.5)
    rng = np.random.default_rng(3)
    labels = [sampler.sample(rng).label for _ in range(200)]
    assert 60 < sum(labels) < 140
    assert ChallengeSampler(_FixedReal(available=False), None).sample(rng) is None
    # No real image cached: no challenge of any kind, not generated ones alone (they would pay "always generated").
    only_fakes = ChallengeSampler(_FixedReal(available=False), SyntheticImageSource(tmp_path), fake_probability=1.0)
    assert [only_fakes.sample(rng) for _ in range(20)] == [None] * 20
    with pytest.raises(ValueError):
        ChallengeSampler(_FixedReal(), None, fake_probability=1.5)
