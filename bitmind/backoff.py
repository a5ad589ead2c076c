"""Exponential back-off after consecutive failures, shared by everything that retries on its own schedule (weight
setting, each real-image source): `base_s` after the first failure, doubled per failure in a row, capped at
`max_s`; one success resets it.
"""

import math
import time
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """When the next try may happen; not thread-safe (each user holds it under its own lock or thread)."""

    def __init__(self, base_s: float, max_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(base_s) and base_s >= 0 and max_s >= base_s):
            raise ValueError(f"back-off needs 0 <= base_s <= max_s, got {base_s} and {max_s}")
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self.failures = 0
        self.retry_at = -math.inf

    def ready(self) -> bool:
        """Whether the back-off after the last failure has passed (always true before any failure)."""
        return self._clock() >= self.retry_at

    def failed(self) -> float:
        """Record one more failure in a row; returns the delay before the next try, in seconds."""
        self.failures += 1
        delay = min(self.max_s, self.base_s * 2 ** min(self.failures - 1, 60))
        self.retry_at = self._clock() + delay
        return delay

    def succeeded(self) -> int:
        """Record a success; returns how many failures in a row it ended (0 when there were none)."""
        ended, self.failures, self.retry_at = self.failures, 0, -math.inf
        return ended
