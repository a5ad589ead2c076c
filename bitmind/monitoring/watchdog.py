"""The watchdog: turns a silent hang (a stuck chain call, a deadlocked GPU) into a process exit so pm2 restarts it."""

import logging
import os
import threading
import time
from collections.abc import Callable

from bitmind.monitoring.metrics import is_real

__all__ = ["DEFAULT_WATCHDOG_TIMEOUT_S", "WATCHDOG_EXIT_CODE", "Watchdog"]

logger = logging.getLogger(__name__)

# Distinct from crashes (1) and signals (128+n) so that pm2 logs show the watchdog was the cause.
WATCHDOG_EXIT_CODE = 75
DEFAULT_WATCHDOG_TIMEOUT_S = 900.0


def _exit_process(idle_s: float) -> None:
    logger.critical("watchdog: no progress for %.0f s, exiting with code %d so the supervisor restarts us",
                    idle_s, WATCHDOG_EXIT_CODE)
    logging.shutdown()
    os._exit(WATCHDOG_EXIT_CODE)


class Watchdog:
    """Calls `on_expire(idle_seconds)` once if `kick()` is not called for `timeout_s` seconds.

    The default `on_expire` logs and `os._exit`s with `WATCHDOG_EXIT_CODE`: a hung main loop cannot be unwound
    from another thread, and pm2 restarts an exited process. `clock` is the time source idleness is measured on
    (tests advance one by hand, so no assertion depends on how fast a loaded machine runs them).
    """

    def __init__(self, timeout_s: float, on_expire: Callable[[float], None] | None = None,
                 name: str = "watchdog", clock: Callable[[], float] = time.monotonic) -> None:
        if not is_real(timeout_s) or timeout_s <= 0:
            raise ValueError(f"watchdog timeout must be a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._on_expire = on_expire or _exit_process
        self._clock = clock
        self._last_kick = clock()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.fired = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Watchdog":
        """Start watching (the timeout counts from now)."""
        self.kick()
        self._thread.start()
        return self

    def kick(self) -> None:
        """Report progress: the timeout restarts from now."""
        with self._lock:
            self._last_kick = self._clock()

    def stop(self) -> None:
        """Stop watching (e.g. on a clean shutdown); the callback will not fire afterwards."""
        self._stopped.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                idle = self._clock() - self._last_kick
            if idle >= self.timeout_s:
                self.fired.set()
                try:
                    self._on_expire(idle)
                except Exception:  # noqa: BLE001 - a broken callback must not hide that the watchdog fired
                    logger.exception("watchdog on_expire callback failed")
                return
            self._stopped.wait(self.timeout_s - idle)
