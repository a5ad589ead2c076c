"""The heartbeat file: a small JSON status, rewritten atomically on every beat, that an operator, a cron job or
`python -m bitmind.monitoring check` reads to see that a process is alive and what it last did."""

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from bitmind import __version__
from bitmind.atomic import atomic_write_bytes
from bitmind.json_safe import json_safe

__all__ = ["Heartbeat", "check_heartbeat"]

logger = logging.getLogger(__name__)

_RESERVED_HEARTBEAT_KEYS = frozenset({"timestamp", "pid", "version", "role"})


class Heartbeat:
    """Atomically rewritten JSON status file.

    Each `beat(**fields)` merges the fields into the status kept so far (so a `last_sync` reported once stays in the
    file while later beats report steps) and rewrites the whole file atomically (`bitmind.atomic`), so a
    reader never sees a partial file. Values that JSON cannot encode are written as strings. Write failures (disk
    full, permissions) are logged and reported as False: a status file must never take the process down.
    """

    def __init__(self, path: str | os.PathLike[str], role: str = "", version: str = __version__) -> None:
        self.path = Path(path).expanduser()
        self.role = role
        self.version = version
        self._fields: dict[str, Any] = {}
        self._lock = threading.Lock()

    def beat(self, **fields: Any) -> bool:
        """Record `fields` and rewrite the file; returns whether the write succeeded."""
        clash = _RESERVED_HEARTBEAT_KEYS.intersection(fields)
        if clash:
            raise ValueError(f"heartbeat fields {sorted(clash)} are reserved (written by Heartbeat itself)")
        with self._lock:
            self._fields.update(json_safe(fields, strict=False))
            status = {
                "timestamp": time.time(),
                "pid": os.getpid(),
                "version": self.version,
                "role": self.role,
                **self._fields,
            }
            try:
                atomic_write_bytes(self.path, json.dumps(status, allow_nan=False, sort_keys=True).encode())
            except OSError as exc:
                logger.warning("heartbeat write to %s failed: %s", self.path, exc)
                return False
        return True


FUTURE_TOLERANCE_S = 60.0  # clocks of a writer and a reader on one host, or NTP-synced hosts, agree far closer


def check_heartbeat(path: str | os.PathLike[str], max_age_s: float) -> tuple[bool, str]:
    """Is the heartbeat file present, valid and younger than `max_age_s`? Returns (ok, one-line reason).

    A beat from more than FUTURE_TOLERANCE_S ahead of this clock is not ok either: after the clock steps back, a
    process that died just after its last beat would otherwise read "ok" for as long as the step."""
    if not (math.isfinite(max_age_s) and max_age_s > 0):
        raise ValueError(f"max_age_s must be a positive number of seconds, got {max_age_s}")
    path = Path(path).expanduser()
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, f"{path}: no heartbeat file"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return False, f"{path}: unreadable heartbeat ({exc})"
    timestamp = status.get("timestamp") if isinstance(status, dict) else None
    if not isinstance(timestamp, (int, float)) or not math.isfinite(timestamp):
        return False, f"{path}: heartbeat has no valid timestamp"
    age = time.time() - timestamp
    summary = f"{status.get('role') or 'process'} pid {status.get('pid')} v{status.get('version')}"
    if age > max_age_s:
        return False, f"{path}: STALE, {summary} last beat {age:.0f} s ago (limit {max_age_s:.0f} s)"
    if age < -FUTURE_TOLERANCE_S:
        return False, f"{path}: {summary} last beat is {-age:.0f} s in the future (a clock step, or a forged file)"
    return True, f"{path}: ok, {summary} last beat {age:.0f} s ago"
