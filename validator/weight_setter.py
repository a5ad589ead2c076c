"""Setting weights on chain from a daemon thread, so a slow, hanging or failing chain never stalls challenges.

The challenge loop calls `maybe_set_weights(block)` after each step; it returns at once. The worker thread then
checks whether `epoch_length` blocks have passed since the last SUCCESSFUL set (a failed set is tried again on
the next request), takes the scorer's current weights and calls `chain.set_weights(..., version_key)` under a
timeout, retrying with bounded exponential backoff. At most one attempt is in flight; a chain call that outlives its
timeout is abandoned (its daemon thread may linger), and no new call starts while it still hangs, so threads never
pile up. Every attempt ends in one log line with the numbers an operator needs.
"""

import argparse
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import bitmind
from bitmind.chain.base import Chain

__all__ = ["WeightSetter", "WeightSetterStats", "add_weight_args"]

logger = logging.getLogger(__name__)

DEFAULT_EPOCH_LENGTH = 100
DEFAULT_TIMEOUT = 120.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 2.0
MAX_BACKOFF = 60.0
_POLL = 0.05  # seconds between checks of the stop flag while a chain call runs

WeightsFn = Callable[[], tuple[list[int], list[float]]]


def add_weight_args(parser: argparse.ArgumentParser) -> None:
    """`--neuron.epoch_length`, `--neuron.weights_timeout`, `--neuron.weights_retries`, `--neuron.weights_backoff`."""
    parser.add_argument(
        "--neuron.epoch_length",
        type=int,
        default=DEFAULT_EPOCH_LENGTH,
        help="Blocks between weight settings: weights are set once this many blocks passed since the last success.",
    )
    parser.add_argument(
        "--neuron.weights_timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="Seconds one set_weights call may take before it is abandoned and retried.",
    )
    parser.add_argument(
        "--neuron.weights_retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="Extra tries after a failed or timed-out set_weights call (0 = a single try).",
    )
    parser.add_argument(
        "--neuron.weights_backoff",
        type=float,
        default=DEFAULT_BACKOFF,
        help=f"Seconds before the first retry; doubled after each further failure, at most {MAX_BACKOFF:g} s.",
    )


@dataclass(frozen=True)
class WeightSetterStats:
    """Counters for monitoring; `attempts` counts chain calls (retries included)."""

    last_success_block: int | None = None
    last_attempt_block: int | None = None
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    timeouts: int = 0
    skipped_hanging: int = 0
    in_flight: bool = False
    last_ok: bool | None = None
    last_message: str = ""
    last_duration_s: float = 0.0


class _CallTimeout(Exception):
    """A chain call outlived the timeout and was abandoned."""


class _Stopping(BaseException):
    """stop() was called mid-attempt; a BaseException so that no `except Exception` swallows it."""


class WeightSetter:
    """Owns the daemon thread that sets weights; see the module docstring for the contract."""

    def __init__(
        self,
        chain: Chain,
        wallet: object,
        weights_fn: WeightsFn,
        epoch_length: int = DEFAULT_EPOCH_LENGTH,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        version_key: int = bitmind.spec_version,
        last_success_block: int | None = None,
    ) -> None:
        if epoch_length < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(
                f"need epoch_length >= 1, timeout > 0, retries >= 0, backoff >= 0; got {epoch_length}, {timeout},"
                f" {retries}, {backoff}"
            )
        self.chain = chain
        self.wallet = wallet
        self.weights_fn = weights_fn
        self.epoch_length = epoch_length
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.version_key = version_key
        self._lock = threading.Lock()
        self._stats = WeightSetterStats(last_success_block=last_success_block)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._requested_block: int | None = None
        self._hanging: threading.Thread | None = None  # an abandoned chain call that has not returned yet
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(
        cls, config, chain: Chain, wallet: object, weights_fn: WeightsFn, last_success_block: int | None = None
    ) -> "WeightSetter":
        return cls(
            chain,
            wallet,
            weights_fn,
            epoch_length=config.neuron.epoch_length,
            timeout=config.neuron.weights_timeout,
            retries=config.neuron.weights_retries,
            backoff=config.neuron.weights_backoff,
            last_success_block=last_success_block,
        )

    @property
    def stats(self) -> WeightSetterStats:
        with self._lock:
            return self._stats

    @property
    def last_success_block(self) -> int | None:
        return self.stats.last_success_block

    def start(self) -> "WeightSetter":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="weight-setter", daemon=True)
            self._thread.start()
        return self

    def maybe_set_weights(self, block: int | None = None) -> bool:
        """Ask the worker to set weights if they are due; never blocks. False when an attempt is already in flight.

        `block` is the caller's current block (e.g. from its last metagraph sync); when None the worker asks the
        chain, under the same timeout.
        """
        if self._thread is None:
            raise RuntimeError("WeightSetter.start() was not called")
        with self._lock:
            if self._stats.in_flight or self._stop.is_set():
                return False
            self._stats = replace(self._stats, in_flight=True)
            self._requested_block = block
        self._wake.set()
        return True

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the worker, waiting at most `timeout` seconds; True when it has stopped."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- worker ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._attempt(self._requested_block)
            except _Stopping:
                return
            except Exception:  # the worker must survive anything; the next request tries again
                logger.exception("weights: unexpected error in the weight setter")
            finally:
                with self._lock:
                    self._stats = replace(self._stats, in_flight=False)

    def _attempt(self, block: int | None) -> None:
        if self._is_hanging():
            self._update(skipped_hanging=self._stats.skipped_hanging + 1)
            logger.warning("weights: skipped, the previous chain call is still hanging")
            return
        if block is None:
            try:
                block = int(self._call(self.chain.block))
            except _CallTimeout:
                logger.warning("weights: chain.block() timed out after %.1f s; next request retries", self.timeout)
                return
            except Exception as exc:
                logger.warning("weights: chain.block() failed (%s: %s)", type(exc).__name__, exc)
                return
        last = self.stats.last_success_block
        if last is not None and block - last < self.epoch_length:
            logger.debug("weights: not due at block %d (last set at %d, epoch %d)", block, last, self.epoch_length)
            return
        try:
            uids, weights = self.weights_fn()
        except Exception as exc:
            self._update(failures=self._stats.failures + 1, last_ok=False, last_message=repr(exc))
            logger.exception("weights: could not compute the weights at block %d", block)
            return
        if not uids:
            logger.info("weights: nothing to set at block %d (no registered uids)", block)
            return
        self._update(last_attempt_block=block)
        started = time.monotonic()
        ok, message, tries = False, "", 0
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF)
                if self._stop.wait(delay):
                    raise _Stopping
                if self._is_hanging():
                    message += "; not retried, the call still hangs"
                    break
            tries += 1
            ok, message = self._try_once(uids, weights)
            if ok:
                break
        duration = time.monotonic() - started
        self._update(
            last_ok=ok,
            last_message=message,
            last_duration_s=duration,
            **(
                {"successes": self._stats.successes + 1, "last_success_block": block}
                if ok
                else {"failures": self._stats.failures + 1}
            ),
        )
        top = sorted(zip(uids, weights), key=lambda pair: -pair[1])[:5]
        logger.log(
            logging.INFO if ok else logging.WARNING,
            "weights: %s at block %d: %d uids, top %s, %d tries, %.2f s, version_key %d: %s",
            "set" if ok else "FAILED",
            block,
            len(uids),
            ", ".join(f"{uid}:{weight:.4f}" for uid, weight in top),
            tries,
            duration,
            self.version_key,
            message,
        )

    def _try_once(self, uids: list[int], weights: list[float]) -> tuple[bool, str]:
        self._update(attempts=self._stats.attempts + 1)
        try:
            ok, message = self._call(self.chain.set_weights, self.wallet, uids, weights, self.version_key)
            return bool(ok), str(message)
        except _CallTimeout:
            self._update(timeouts=self._stats.timeouts + 1)
            return False, f"timed out after {self.timeout:g} s"
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"

    def _call(self, fn: Callable, *args):
        """Run `fn(*args)` in a daemon thread; raise _CallTimeout past the timeout, _Stopping on stop()."""
        outcome: dict[str, object] = {}
        done = threading.Event()

        def target() -> None:
            try:
                outcome["value"] = fn(*args)
            except BaseException as exc:  # handed back to the worker thread
                outcome["error"] = exc
            finally:
                done.set()

        thread = threading.Thread(target=target, name="weight-setter-call", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.timeout
        while not done.wait(min(_POLL, max(0.0, deadline - time.monotonic()))):
            if self._stop.is_set():
                self._hanging = thread
                raise _Stopping
            if time.monotonic() >= deadline:
                self._hanging = thread
                raise _CallTimeout
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["value"]

    def _is_hanging(self) -> bool:
        return self._hanging is not None and self._hanging.is_alive()

    def _update(self, **changes) -> None:
        with self._lock:
            self._stats = replace(self._stats, **changes)
