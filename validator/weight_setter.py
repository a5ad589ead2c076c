"""Setting weights on chain from a daemon thread, so a slow, hanging or failing chain never stalls challenges.

The challenge loop calls `maybe_set_weights(block)` after each step; it returns at once. The worker thread then
decides, in this order, whether to send weights now:

1. not before `--neuron.weights_backoff` seconds after a failed try (doubled per consecutive failure, capped);
2. `epoch_length` blocks since the last SUCCESSFUL set (a failed set is tried again on a later request);
3. nothing holds it back (`hold_fn`, e.g. the validator has no validator permit);
4. the chain's rules allow it (`chain.weights_rules`): our version_key meets the subnet's `weights_version`, and
   strictly more than `weights_rate_limit` blocks passed since our last accepted weights.

Only then does it call `chain.set_weights` once: one try is one extrinsic. A reason that holds weights back is
logged once when it appears (and once when it clears), not on every step. Timeouts are the chain's job (one timeout
layer: `BittensorChain` bounds each call with `--chain.timeout`); at most one request is in flight, so a hanging
chain never piles up threads. Every try ends in one log line with the numbers an operator needs.
"""

import argparse
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import bitmind
from bitmind.backoff import Backoff
from bitmind.chain.base import Chain, hotkey_of

__all__ = ["WeightSetter", "WeightSetterStats", "add_weight_args"]

logger = logging.getLogger(__name__)

DEFAULT_EPOCH_LENGTH = 100
DEFAULT_BACKOFF = 60.0
MAX_BACKOFF = 1200.0  # 100 blocks: one default epoch

WeightsFn = Callable[[], tuple[list[int], list[float]]]
HoldFn = Callable[[], str | None]


def add_weight_args(parser: argparse.ArgumentParser) -> None:
    """`--neuron.epoch_length`, `--neuron.weights_backoff`."""
    parser.add_argument(
        "--neuron.epoch_length",
        type=int,
        default=DEFAULT_EPOCH_LENGTH,
        help="Blocks between weight settings: weights are set once this many blocks passed since the last success "
        "and the subnet's weights_rate_limit allows it.",
    )
    parser.add_argument(
        "--neuron.weights_backoff",
        type=float,
        default=DEFAULT_BACKOFF,
        help=f"Seconds before trying again after a failed set_weights (each try is one extrinsic); doubled after "
        f"each further consecutive failure, at most {MAX_BACKOFF:g} s.",
    )


@dataclass(frozen=True)
class WeightSetterStats:
    """Counters for monitoring; `attempts` counts set_weights calls (one extrinsic each)."""

    last_success_block: int | None = None
    last_attempt_block: int | None = None
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    in_flight: bool = False
    held: str = ""  # why weights are held back right now ("" when nothing holds them)
    last_ok: bool | None = None
    last_message: str = ""
    last_duration_s: float = 0.0


class WeightSetter:
    """Owns the daemon thread that sets weights; see the module docstring for the contract.

    `hold_fn` returns why weights must not be sent now (None when they may); `clock` is injectable for tests.
    """

    def __init__(
        self,
        chain: Chain,
        wallet: object,
        weights_fn: WeightsFn,
        epoch_length: int = DEFAULT_EPOCH_LENGTH,
        backoff: float = DEFAULT_BACKOFF,
        version_key: int = bitmind.spec_version,
        last_success_block: int | None = None,
        hold_fn: HoldFn | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        problem = self.check_settings(epoch_length, backoff)
        if problem:
            raise ValueError(problem)
        self.chain = chain
        self.wallet = wallet
        self.weights_fn = weights_fn
        self.epoch_length = epoch_length
        self.backoff = backoff
        self.version_key = version_key
        self.hold_fn = hold_fn
        self._lock = threading.Lock()
        self._stats = WeightSetterStats(last_success_block=last_success_block)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._requested_block: int | None = None
        self._backoff = Backoff(min(backoff, MAX_BACKOFF), MAX_BACKOFF, clock)
        self._thread: threading.Thread | None = None

    @staticmethod
    def check_settings(epoch_length: int, backoff: float) -> str | None:
        """Why these settings cannot run (None when they can)."""
        if epoch_length < 1 or not backoff >= 0:
            return f"need --neuron.epoch_length >= 1 and --neuron.weights_backoff >= 0; got {epoch_length}, {backoff}"
        return None

    @classmethod
    def from_config(
        cls,
        config,
        chain: Chain,
        wallet: object,
        weights_fn: WeightsFn,
        last_success_block: int | None = None,
        hold_fn: HoldFn | None = None,
    ) -> "WeightSetter":
        return cls(
            chain,
            wallet,
            weights_fn,
            epoch_length=config.neuron.epoch_length,
            backoff=config.neuron.weights_backoff,
            last_success_block=last_success_block,
            hold_fn=hold_fn,
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
        """Ask the worker to set weights if they are due; never blocks. False when a request is already in flight.

        `block` is the caller's current block (e.g. from its last metagraph sync); when None the worker asks the
        chain.
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
        """Stop the worker, waiting at most `timeout` seconds; True when it has stopped (a chain call in flight
        keeps it until the call returns; the thread is a daemon, so it never holds the process)."""
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
            except Exception:  # the worker must survive anything; the next request tries again
                logger.exception("weights: unexpected error in the weight setter")
            finally:
                with self._lock:
                    self._stats = replace(self._stats, in_flight=False)

    def _attempt(self, block: int | None) -> None:
        if not self._backoff.ready():
            logger.debug("weights: backing off after %d failed tries", self._backoff.failures)
            return
        if block is None:
            try:
                block = int(self.chain.block())
            except Exception as exc:
                logger.warning("weights: chain.block() failed (%s: %s); the next request retries",
                               type(exc).__name__, exc)
                return
        last = self.stats.last_success_block
        if last is not None and block < last:
            # A state from another chain (a local chain made anew, a reset testnet): waiting for that block would
            # hold weights back without a word. The chain's own rate limit still guards against sending too often.
            logger.warning("weights: the last set block on record (%d) is ahead of the chain (block %d); forgotten",
                           last, block)
            self._update(last_success_block=None)
            last = None
        if last is not None and block - last < self.epoch_length:
            logger.debug("weights: not due at block %d (last set at %d, epoch %d)", block, last, self.epoch_length)
            return
        reason, level = (self.hold_fn() if self.hold_fn else None), logging.WARNING
        if reason is None:
            try:
                rules = self.chain.weights_rules(hotkey_of(self.wallet))
            except Exception as exc:
                logger.warning("weights: could not read the subnet's weights rules (%s: %s); the next request "
                               "retries", type(exc).__name__, exc)
                return
            reason, level = rules.version_problem(self.version_key), logging.ERROR
        if self._held(reason, block, level):
            return
        wait = rules.blocks_to_wait()
        if wait:
            logger.debug(
                "weights: due, but the chain's weights_rate_limit (%d) needs %d more blocks (%d since our last)",
                rules.rate_limit, wait, rules.blocks_since_update,
            )
            return
        self._send(block)

    def _held(self, reason: str | None, block: int, level: int = logging.WARNING) -> bool:
        """Record why weights are held back; log only when the reason changes. True when held."""
        previous = self.stats.held
        if (reason or "") != previous:
            if reason:
                logger.log(level, "weights: not sent at block %d: %s", block, reason)
            else:
                logger.info("weights: no longer held back at block %d (was: %s)", block, previous)
            self._update(held=reason or "")
        return bool(reason)

    def _send(self, block: int) -> None:
        try:
            uids, weights = self.weights_fn()
        except Exception as exc:
            self._update(failures=self._stats.failures + 1, last_ok=False, last_message=repr(exc))
            logger.exception("weights: could not compute the weights at block %d", block)
            return
        if not uids:
            logger.info("weights: nothing to set at block %d (no registered uids)", block)
            return
        self._update(last_attempt_block=block, attempts=self._stats.attempts + 1)
        started = time.monotonic()
        try:
            ok, message = self.chain.set_weights(self.wallet, uids, weights, self.version_key)
            ok, message = bool(ok), str(message)
        except Exception as exc:  # ChainError (unreachable, timed out) or a broken answer
            ok, message = False, f"{type(exc).__name__}: {exc}"
        duration = time.monotonic() - started
        if ok:
            self._backoff.succeeded()
            outcome = {"successes": self._stats.successes + 1, "last_success_block": block}
        else:
            delay = self._backoff.failed()
            message += f"; next try in {delay:g} s at the earliest"
            outcome = {"failures": self._stats.failures + 1}
        self._update(last_ok=ok, last_message=message, last_duration_s=duration, **outcome)
        top = sorted(zip(uids, weights), key=lambda pair: -pair[1])[:5]
        logger.log(
            logging.INFO if ok else logging.WARNING,
            "weights: %s at block %d: %d uids, top %s, %.2f s, version_key %d: %s",
            "set" if ok else "FAILED",
            block,
            len(uids),
            ", ".join(f"{uid}:{weight:.4f}" for uid, weight in top),
            duration,
            self.version_key,
            message,
        )

    def _update(self, **changes) -> None:
        with self._lock:
            self._stats = replace(self._stats, **changes)
