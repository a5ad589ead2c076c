"""The validator's persistent state: one JSON file, written atomically, validated on load.

Why JSON and not pickle: loading a pickle runs code, and a state file is only data. The file carries a format
version and the netuid, so a file from another format or another subnet is never mistaken for ours.

Lifecycle: `StateStore.load()` comes first (a restart keeps scores and histories; the 2024 template saved zeroed
state before loading and wiped them); `save()` refuses to run before it. A corrupt, truncated, foreign or
unreadable file is moved aside to `<name>.corrupt-<UTC timestamp>` with a warning, and the validator starts fresh.
`save()` writes through `bitmind.atomic` (temporary file in the same folder, fsync, `os.replace`), so a crash at
any point leaves either the old or the new file, never a torn one.
"""

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bitmind.atomic import atomic_write_bytes, temp_target

__all__ = [
    "STATE_FILENAME",
    "STATE_FORMAT_VERSION",
    "MinerRecordState",
    "ScorerState",
    "StateStore",
    "ValidatorState",
]

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1
STATE_FILENAME = "validator_state.json"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # ~2 MB for 256 miners x 100 entries; anything this large is not ours

Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Label = Annotated[int, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class MinerRecordState(_Strict):
    """One hotkey's rolling histories of valid answers (images; video clips) and its lifetime answer counters."""

    history: list[tuple[Label, Probability]] = Field(default_factory=list)
    queried: Count = 0
    answered: Count = 0
    invalid: Count = 0
    video_history: list[tuple[Label, Probability]] = Field(default_factory=list)  # absent in files before video


class ScorerState(_Strict):
    """What `Scorer.snapshot()` returns and `Scorer.from_snapshot()` takes: index i of scores/hotkeys is uid i."""

    step: Count = 0
    scores: list[Probability] = Field(default_factory=list)
    hotkeys: list[str] = Field(default_factory=list)
    miners: dict[str, MinerRecordState] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _aligned(self) -> "ScorerState":
        if len(self.scores) != len(self.hotkeys):
            raise ValueError(f"{len(self.scores)} scores but {len(self.hotkeys)} hotkeys")
        return self


class ValidatorState(_Strict):
    """The whole file."""

    format_version: int = STATE_FORMAT_VERSION
    netuid: int
    saved_at: float = 0.0
    last_weights_block: Count | None = None
    scorer: ScorerState = Field(default_factory=ScorerState)


class StateStore:
    """Loads and atomically saves the `ValidatorState` of one subnet at `path`."""

    def __init__(self, path: str | os.PathLike, netuid: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(path).expanduser()
        self.netuid = netuid
        self.max_bytes = max_bytes
        self._loaded = False

    @classmethod
    def in_dir(cls, state_dir: str | os.PathLike, netuid: int) -> "StateStore":
        """The store for `--neuron.state_dir`."""
        return cls(Path(state_dir).expanduser() / STATE_FILENAME, netuid)

    def load(self) -> ValidatorState | None:
        """The saved state, or None (fresh start) when there is none or it is not usable (then moved aside)."""
        self._loaded = True
        self._remove_stale_temp_files()
        if not self.path.exists():
            logger.info("state: no file at %s, starting fresh", self.path)
            return None
        try:
            state = self._read()
        except _UnusableState as exc:
            aside = self._move_aside()
            logger.warning("state: %s is unusable (%s); moved to %s, starting fresh", self.path, exc, aside)
            return None
        logger.info(
            "state: loaded %s (step %d, %d uids, %d histories, last weights block %s)",
            self.path,
            state.scorer.step,
            len(state.scorer.scores),
            len(state.scorer.miners),
            state.last_weights_block,
        )
        return state

    def save(self, scorer: ScorerState, last_weights_block: int | None = None) -> bool:
        """Write the state atomically; False (with an error logged) when the disk refuses, so the loop goes on."""
        if not self._loaded:
            raise RuntimeError("StateStore.save() before load(): that would overwrite the saved scores")
        state = ValidatorState(
            netuid=self.netuid, saved_at=time.time(), last_weights_block=last_weights_block, scorer=scorer
        )
        try:
            atomic_write_bytes(self.path, state.model_dump_json().encode())
        except OSError as exc:
            logger.error("state: could not save %s (%s); keeping the previous file", self.path, exc)
            return False
        return True

    def _read(self) -> ValidatorState:
        if not self.path.is_file():
            raise _UnusableState("not a regular file")
        try:
            size = self.path.stat().st_size
            if size > self.max_bytes:
                raise _UnusableState(f"{size} bytes, over the {self.max_bytes}-byte limit")
            data = self.path.read_bytes()
            raw: Any = json.loads(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise _UnusableState(f"unreadable: {type(exc).__name__}: {exc}") from exc
        if not isinstance(raw, dict):
            raise _UnusableState(f"not a JSON object but {type(raw).__name__}")
        if raw.get("format_version") != STATE_FORMAT_VERSION:
            raise _UnusableState(
                f"format version {raw.get('format_version')!r}, this validator reads {STATE_FORMAT_VERSION}"
            )
        if raw.get("netuid") != self.netuid:
            raise _UnusableState(f"state of netuid {raw.get('netuid')!r}, this validator runs netuid {self.netuid}")
        try:
            # Validated in JSON mode: arrays become tuples while bools and numeric strings stay rejected.
            return ValidatorState.model_validate_json(data)
        except ValidationError as exc:
            raise _UnusableState(f"invalid content: {exc.error_count()} errors, first: {_first_error(exc)}") from exc

    def _move_aside(self) -> Path | None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            logger.error("state: could not move %s aside (%s)", self.path, exc)
            return None
        return aside

    def _remove_stale_temp_files(self) -> None:
        """Temporary files left by a crash between write and rename are never the live state."""
        if not self.path.parent.is_dir():
            return
        for stale in self.path.parent.iterdir():
            if temp_target(stale.name) == self.path.name:
                logger.info("state: removing %s left by an interrupted save", stale)
                stale.unlink(missing_ok=True)


class _UnusableState(Exception):
    """The state file exists but cannot be used; the message says why."""


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"])
    return f"{location}: {error['msg']}"
