"""The local subnet's leaderboard: the validator's saved scores joined with the weights it set on the local chain.

Why a separate reader: `StateStore.load()` belongs to the validator that owns the file (it moves an unusable
file aside and removes temporary files of an interrupted save, which would break a save in flight), so the
leaderboard only reads the file and validates it with the same pydantic model. Accuracy and MCC come from
`Scorer.all_stats()` over the histories the validator kept, exactly as the validator computes them.
"""

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError

from validator.scoring import Scorer
from validator.state import STATE_FILENAME, ValidatorState

__all__ = ["SUMMARY_KEYS", "Leaderboard", "MinerInfo", "MinerRow", "build_leaderboard", "read_validator_state"]

SUMMARY_KEYS = ("uid", "hotkey", "detector", "answered", "accuracy", "mcc", "score", "weight")


@dataclass(frozen=True)
class MinerInfo:
    """What the orchestrator knows about a miner it started."""

    uid: int
    hotkey: str
    detector: str


@dataclass(frozen=True)
class MinerRow:
    """One line of the leaderboard; `weight` is what the validator last set on chain (0 before any weights)."""

    uid: int
    hotkey: str
    detector: str
    answered: int
    queried: int
    accuracy: float
    mcc: float
    score: float
    weight: float

    def summary(self) -> dict[str, object]:
        row = asdict(self)
        return {key: row[key] for key in SUMMARY_KEYS}


@dataclass(frozen=True)
class Leaderboard:
    """Rows best score first; `rounds` is the validator's step count (challenges scored)."""

    rounds: int
    rows: tuple[MinerRow, ...]
    weights_set: bool

    def summary(self) -> dict[str, object]:
        """The `--summary` JSON document."""
        return {"rounds": self.rounds, "miners": [row.summary() for row in self.rows]}

    def render(self, title: str = "") -> str:
        """A plain-text table (no colours, so it reads the same in a log file)."""
        header = (
            f"{'rank':>4}  {'uid':>3}  {'detector':<16} {'answered':>9}  {'accuracy':>8}  {'MCC':>6}  {'score':>6}  "
            f"{'weight':>6}"
        )
        lines = [title] if title else []
        lines += [header, "-" * len(header)]
        for rank, row in enumerate(self.rows, start=1):
            weight = f"{row.weight:6.3f}" if self.weights_set else f"{'-':>6}"
            lines.append(
                f"{rank:>4}  {row.uid:>3}  {row.detector[:16]:<16} {f'{row.answered}/{row.queried}':>9}  "
                f"{row.accuracy:8.3f}  {row.mcc:+6.3f}  {row.score:6.3f}  {weight}"
            )
        if not self.weights_set:
            lines.append("(no weights on chain yet)")
        return "\n".join(lines)


def read_validator_state(state_dir: str | Path, netuid: int) -> ValidatorState | None:
    """The validator's saved state, or None while there is none (or it is not a valid state of this subnet)."""
    path = Path(state_dir) / STATE_FILENAME
    try:
        state = ValidatorState.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, json.JSONDecodeError):
        return None
    return state if state.netuid == netuid else None


def build_leaderboard(
    state: ValidatorState | None, weights: dict[int, float], miners: Sequence[MinerInfo]
) -> Leaderboard:
    """Join the validator's figures (by uid, checked against the hotkey) with the on-chain weights."""
    by_uid = {}
    if state is not None:
        scorer = Scorer.from_snapshot(state.scorer)
        by_uid = {stats.uid: stats for stats in scorer.all_stats()}
    rows = []
    for miner in miners:
        stats = by_uid.get(miner.uid)
        if stats is not None and stats.hotkey != miner.hotkey:
            stats = None  # the validator has not synced this uid's current hotkey yet
        rows.append(
            MinerRow(
                uid=miner.uid,
                hotkey=miner.hotkey,
                detector=miner.detector,
                answered=stats.answered if stats else 0,
                queried=stats.queried if stats else 0,
                accuracy=stats.accuracy if stats else 0.0,
                mcc=stats.mcc if stats else 0.0,
                score=stats.score if stats else 0.0,
                weight=float(weights.get(miner.uid, 0.0)),
            )
        )
    rows.sort(key=lambda row: (-row.score, row.uid))
    return Leaderboard(rounds=state.scorer.step if state else 0, rows=tuple(rows), weights_set=bool(weights))
