"""The miner's micro-batcher: batching really happens, and one bad request never spoils its batch."""

import asyncio
import struct
import threading
import time

import numpy as np
import pytest
from PIL import Image

from base_miner.batcher import MicroBatcher, QueueFull
from base_miner.detectors.base import Prediction
from bitmind.image_codec import encode_image


def _payload(value: int) -> str:
    return encode_image(Image.new("RGB", (32, 32), (value, value, value)), size=None, fmt="PNG")


class RecordingDetector:
    """Answers the mean brightness; raises on pure red images; records every batch it sees."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.thread_names: set[str] = set()

    def __call__(self, images):
        self.batches.append(len(images))
        self.thread_names.add(threading.current_thread().name)
        time.sleep(self.delay)
        out = []
        for image in images:
            pixels = np.asarray(image, dtype=np.float64)
            if pixels[..., 0].mean() > 250 and pixels[..., 1].mean() < 5:
                raise RuntimeError("red images crash this detector")
            out.append(Prediction(probability=pixels.mean() / 255.0, route="test"))
        return out


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_and_answered_in_order():
    detector = RecordingDetector(delay=0.02)

    async def main():
        batcher = MicroBatcher(detector, batch_size=8, max_wait_ms=20)
        results = await asyncio.gather(*(batcher.submit(_payload(v)) for v in range(0, 240, 10)))
        await batcher.close()
        return results

    results = _run(main())
    assert [round(r.prediction.probability * 255) for r in results] == list(range(0, 240, 10))
    assert sum(detector.batches) == 24
    assert max(detector.batches) == 8 and len(detector.batches) < 24
    assert all(name.startswith("detector") for name in detector.thread_names)


def test_batch_size_one_is_valid():
    detector = RecordingDetector()

    async def main():
        batcher = MicroBatcher(detector, batch_size=1, max_wait_ms=0)
        results = await asyncio.gather(*(batcher.submit(_payload(v)) for v in (10, 20, 30)))
        await batcher.close()
        return results

    results = _run(main())
    assert detector.batches == [1, 1, 1]
    assert all(r.prediction is not None for r in results)


def test_hostile_payload_fails_alone():
    detector = RecordingDetector()

    async def main():
        batcher = MicroBatcher(detector, batch_size=8, max_wait_ms=30)
        payloads = [_payload(50), "%%% not base64 %%%", _payload(100), ""]
        results = await asyncio.gather(*(batcher.submit(p) for p in payloads))
        await batcher.close()
        return results

    good, garbage, good2, empty = _run(main())
    assert good.prediction is not None and good2.prediction is not None
    assert garbage.prediction is None and "bad image" in garbage.error
    assert empty.prediction is None and "empty" in empty.error
    assert detector.batches == [2]


def test_a_decoder_that_breaks_fails_its_request_alone():
    """Whatever a decoder raises (here a struct.error, as Pillow's EXIF code did), only its own request fails."""

    def decode(payload: str) -> Image.Image:
        if payload == "boom":
            raise struct.error("required argument is not an integer")
        return Image.new("RGB", (32, 32), (int(payload),) * 3)

    async def main():
        batcher = MicroBatcher(RecordingDetector(), batch_size=4, max_wait_ms=30, decode=decode)
        results = await asyncio.gather(*(batcher.submit(p) for p in ("10", "boom", "20")))
        await batcher.close()
        return results

    first, broken, third = _run(main())
    assert broken.prediction is None and broken.error == "bad payload: error: required argument is not an integer"
    assert first.prediction.probability == pytest.approx(10 / 255)
    assert third.prediction.probability == pytest.approx(20 / 255)


def test_detector_exception_on_one_image_spares_the_rest():
    detector = RecordingDetector()
    red = encode_image(Image.new("RGB", (32, 32), (255, 0, 0)), size=None, fmt="PNG")

    async def main():
        batcher = MicroBatcher(detector, batch_size=4, max_wait_ms=30)
        results = await asyncio.gather(*(batcher.submit(p) for p in (_payload(10), red, _payload(20))))
        await batcher.close()
        return results

    first, crashed, third = _run(main())
    assert crashed.prediction is None and "detector error" in crashed.error
    assert first.prediction.probability == pytest.approx(10 / 255)
    assert third.prediction.probability == pytest.approx(20 / 255)


def test_full_queue_sheds_load_immediately():
    detector = RecordingDetector(delay=0.2)

    async def main():
        batcher = MicroBatcher(detector, batch_size=1, max_wait_ms=0, max_queue=2)
        tasks = [asyncio.create_task(batcher.submit(_payload(v))) for v in range(6)]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return outcomes

    outcomes = _run(main())
    shed = [o for o in outcomes if isinstance(o, QueueFull)]
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    assert shed and answered and len(shed) + len(answered) == 6


def test_stale_requests_are_dropped_not_computed():
    # The first request is taken at once (a second to spare on a loaded machine); the others wait behind its 1.2 s
    # prediction, longer than max_age_s whatever the machine's speed.
    detector = RecordingDetector(delay=1.2)

    async def main():
        batcher = MicroBatcher(detector, batch_size=1, max_wait_ms=0, max_age_s=1.0)
        results = await asyncio.gather(*(batcher.submit(_payload(v)) for v in range(3)))
        await batcher.close()
        return results

    results = _run(main())
    assert results[0].prediction is not None
    assert any("dropped" in r.error for r in results[1:])
    assert sum(detector.batches) < 3


def _worker_held_by_the_first_request():
    """(predict, brightness of every image it saw, set when the first request is in, set to let it go on)."""
    detector = RecordingDetector()
    seen: list[int] = []
    busy, release = threading.Event(), threading.Event()

    def predict(images):
        seen.extend(round(np.asarray(image).mean()) for image in images)
        if len(seen) == 1:  # the first request holds the worker until the rest are queued
            busy.set()
            assert release.wait(30)
        return detector(images)

    return predict, seen, busy, release


def test_waiting_requests_are_served_by_priority_then_arrival():
    predict, seen, busy, release = _worker_held_by_the_first_request()

    async def main():
        batcher = MicroBatcher(predict, batch_size=1, max_wait_ms=0)
        first = asyncio.create_task(batcher.submit(_payload(1)))
        assert await asyncio.to_thread(busy.wait, 30)
        rest = [
            asyncio.create_task(batcher.submit(_payload(value), priority=stake))
            for value, stake in ((10, 0.0), (20, 50.0), (30, 0.0), (40, 900.0), (50, 50.0))
        ]
        await asyncio.sleep(0)  # one loop turn: each new task runs up to its (immediate) put on the queue
        release.set()
        await asyncio.gather(first, *rest)
        await batcher.close()

    _run(main())
    assert seen == [1, 40, 20, 50, 10, 30]


def test_a_full_queue_sheds_its_lowest_caller_for_a_higher_one():
    """Full of low-stake requests, the queue still takes a high-stake caller (shedding its newest lowest-ranked
    request), refuses another low-stake one, and frees the places of requests that waited past max_age_s."""
    predict, seen, busy, release = _worker_held_by_the_first_request()

    async def main():
        batcher = MicroBatcher(predict, batch_size=1, max_wait_ms=0, max_queue=3, max_age_s=600.0)
        first = asyncio.create_task(batcher.submit(_payload(1)))
        assert await asyncio.to_thread(busy.wait, 30)
        low = [asyncio.create_task(batcher.submit(_payload(value))) for value in (10, 20, 30)]
        await asyncio.sleep(0)
        whale = asyncio.create_task(batcher.submit(_payload(40), priority=900.0))
        await asyncio.sleep(0)
        late = asyncio.create_task(batcher.submit(_payload(50)))
        await asyncio.sleep(0)
        batcher.max_age_s = 1e-9  # everything waiting is now stale: a newcomer finds room
        fresh = asyncio.create_task(batcher.submit(_payload(60)))
        await asyncio.sleep(0)
        batcher.max_age_s = 600.0
        release.set()
        outcomes = await asyncio.gather(first, *low, whale, late, fresh, return_exceptions=True)
        await batcher.close()
        return outcomes

    first, low10, low20, low30, whale, late, fresh = _run(main())
    assert isinstance(low30, QueueFull) and "higher priority" in str(low30)  # the newest of the lowest rank
    assert isinstance(late, QueueFull) and "already waiting" in str(late)  # a low caller does not shed its peers
    assert "dropped" in low10.error and "dropped" in low20.error and "dropped" in whale.error
    assert fresh.prediction is not None and seen == [1, 60]


def test_workers_predict_batches_at_the_same_time():
    # Each call waits until another call is inside predict too: one worker alone would break the barrier.
    barrier = threading.Barrier(2, timeout=5)
    detector = RecordingDetector()

    def predict(images):
        barrier.wait()
        return detector(images)

    async def main():
        batcher = MicroBatcher(predict, batch_size=2, max_wait_ms=0, workers=2)
        results = await asyncio.gather(*(batcher.submit(_payload(v)) for v in (10, 20, 30, 40)))
        await batcher.close()
        return results

    results = _run(main())
    assert [r.prediction.probability for r in results] == pytest.approx([v / 255 for v in (10, 20, 30, 40)])
    assert len(detector.thread_names) == 2 and not barrier.broken


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 0}, {"max_wait_ms": -1}, {"max_queue": 0}, {"max_age_s": 0}, {"workers": 0}]
)
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        MicroBatcher(RecordingDetector(), **kwargs)
