"""Micro-batching between the miner's event loop and the detector.

Requests are collected for up to `max_wait_ms` (or until `batch_size` are waiting), decoded and predicted in ONE
forward pass on a worker thread, so the Axon's event loop keeps accepting requests while the model works.
With `workers` > 1, that many batches run at once (torch and PIL release the GIL): on a CPU, one single-threaded
batch per core beats one batch spread over all cores, whose threads stall whenever request handling takes a core.
Waiting requests are served highest priority first (the miner passes the caller's stake), oldest first among equals;
a full queue sheds its lowest-ranked request for a newcomer that outranks it, and refuses the newcomer otherwise.
A payload that fails to decode, or an image the detector chokes on, fails alone: the rest of its batch is answered.
The same batcher serves clips: `decode` turns a payload into what `predict_fn` takes (an image by default; the
miner passes `bitmind.video_codec.decode_clip` for its video detector).
"""

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from base_miner.detectors.base import Prediction
from bitmind.image_codec import DecodeLimits, ImageDecodeError, decode_image

__all__ = ["BatchResult", "MicroBatcher", "QueueFull"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are waiting than the miner can answer in time; the caller is shed at once."""


@dataclass
class BatchResult:
    """What one request gets back: a prediction, or the reason there is none."""

    prediction: Prediction | None
    error: str = ""
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0


@dataclass(order=True)
class _Pending:
    rank: tuple[float, int]  # (-priority, arrival number): the priority queue pops the smallest
    payload: str = field(compare=False)
    future: asyncio.Future = field(compare=False)
    enqueued: float = field(compare=False)


class MicroBatcher:
    """Turns concurrent `submit(payload)` calls into batched `predict_fn(images)` calls on `workers` threads.

    `predict_fn` must be safe to call from several threads at once when `workers` > 1 (inference-only torch
    modules are; the face gate locks its dlib models).
    """

    def __init__(
        self,
        predict_fn: Callable[[list[Image.Image]], list[Prediction]],
        batch_size: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        max_age_s: float = 8.0,
        limits: DecodeLimits = DecodeLimits(),
        workers: int = 1,
        decode: Callable[[str], Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_wait_ms < 0 or max_queue < 1 or max_age_s <= 0 or workers < 1:
            raise ValueError("max_wait_ms must be >= 0, max_queue >= 1, max_age_s > 0 and workers >= 1")
        self.predict_fn = predict_fn
        self.batch_size = batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_age_s = max_age_s
        self.limits = limits
        self.decode = decode or (lambda payload: decode_image(payload, self.limits))
        self.kind = "image" if decode is None else "payload"
        self._queue: asyncio.PriorityQueue[_Pending] | None = None
        self._waiting: dict[int, _Pending] = {}  # queued and not yet taken by a worker, by arrival number
        self._arrivals = itertools.count()
        self.workers = workers
        self._tasks: list[asyncio.Task] = []
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="detector")

    async def submit(self, payload: str, priority: float = 0.0) -> BatchResult:
        """Queue one base64 image and wait for its answer; higher `priority` is served sooner."""
        if not self._tasks:
            self._queue = asyncio.PriorityQueue()
            self._tasks = [asyncio.get_running_loop().create_task(self._run()) for _ in range(self.workers)]
        rank = (-priority, next(self._arrivals))
        if len(self._waiting) >= self.max_queue:
            self._make_room(rank)
        item = _Pending(rank, payload, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._waiting[rank[1]] = item
        await self._queue.put(item)
        return await item.future

    def _make_room(self, rank: tuple[float, int]) -> None:
        """A full queue: answer what waited past `max_age_s` (it would be dropped anyway) and forget what its caller
        gave up on; still full, shed the lowest-ranked waiting request if the newcomer outranks it, else the newcomer
        (QueueFull). So a flood of low-priority callers can never shut out a higher one."""
        now = time.perf_counter()
        for arrival, item in list(self._waiting.items()):
            stale = self._stale(item, now)
            if stale and not item.future.done():
                item.future.set_result(BatchResult(None, stale))
            if item.future.done():
                del self._waiting[arrival]
        if len(self._waiting) < self.max_queue:
            return
        lowest = max(self._waiting.values())
        if rank > lowest.rank:
            raise QueueFull(f"{len(self._waiting)} requests already waiting")
        del self._waiting[lowest.rank[1]]
        lowest.future.set_exception(QueueFull(f"shed for a caller of higher priority ({self.max_queue} waiting)"))

    def _stale(self, item: _Pending, now: float) -> str | None:
        """Why a request that waited past `max_age_s` gets no answer (None while it is fresh): its caller has given
        up, or soon will."""
        waited = now - item.enqueued
        return f"dropped after waiting {waited:.1f}s" if waited > self.max_age_s else None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.batch_size:
                remaining = deadline - loop.time()
                try:
                    batch.append(
                        self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
                    )
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            for item in batch:
                self._waiting.pop(item.rank[1], None)
            live = [item for item in batch if not item.future.done()]
            try:
                results = await loop.run_in_executor(self._executor, self._process, live)
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                log.exception("batch of %d failed", len(live))
                results = [BatchResult(None, f"internal error: {exc}") for _ in live]
            for item, result in zip(live, results):
                if not item.future.done():
                    item.future.set_result(result)

    def _process(self, batch: list[_Pending]) -> list[BatchResult]:
        """Runs on the worker thread: decode, drop stale requests, predict, isolate failures."""
        started = time.perf_counter()
        results: list[BatchResult] = [BatchResult(None) for _ in batch]
        images: list[Image.Image] = []
        slots: list[int] = []
        for index, item in enumerate(batch):
            results[index].queue_ms = (started - item.enqueued) * 1000.0
            stale = self._stale(item, started)
            if stale:
                results[index].error = stale
                continue
            try:
                images.append(self.decode(item.payload))
                slots.append(index)
            except ImageDecodeError as exc:  # VideoDecodeError is one too
                results[index].error = f"bad {self.kind}: {exc}"
            except Exception as exc:  # noqa: BLE001 - a decoder bug must fail its own request, never the batch
                log.warning("the %s decoder failed unexpectedly: %s: %s", self.kind, type(exc).__name__, exc)
                results[index].error = f"bad {self.kind}: {type(exc).__name__}: {exc}"
        for index, prediction in zip(slots, self._predict_isolated(images)):
            if isinstance(prediction, Prediction):
                results[index].prediction = prediction
            else:
                results[index].error = prediction
        compute_ms = (time.perf_counter() - started) * 1000.0
        for result in results:
            result.compute_ms = compute_ms
            result.batch_size = len(batch)
        return results

    def _predict_isolated(self, images: list[Image.Image]) -> list[Prediction | str]:
        """One forward pass; if it fails, retry image by image so only the culprit fails."""
        if not images:
            return []
        try:
            return self._checked(self.predict_fn(images), len(images))
        except Exception as exc:  # noqa: BLE001
            if len(images) == 1:
                log.warning("detector failed on an image: %s", exc)
                return [f"detector error: {exc}"]
        return [outcome for image in images for outcome in self._predict_isolated([image])]

    @staticmethod
    def _checked(predictions: list[Prediction], expected: int) -> list[Prediction]:
        if len(predictions) != expected:
            raise RuntimeError(f"detector returned {len(predictions)} predictions for {expected} images")
        return predictions

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        self._executor.shutdown(wait=False, cancel_futures=True)
