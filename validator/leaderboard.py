"""The local subnet's leaderboard (bitmind-localnet): the validator's saved scores joined with the weights it set on
the local chain.

Why a separate reader: `StateStore.load()` belongs to the validator that owns the file (it moves an unusable
file aside and removes temporary files of an interrupted save, which would break a save in flight), so the
leaderboard only reads the file and validates it with the same pydantic model. Accuracy and MCC come from
`Scorer.all_stats()` over the histories the validator kept, exactly as the validator computes them; the image
columns read the image history, the `video:` line the clip history.
"""

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError

from bitmind.protocol import is_generated
from validator.scoring import Scorer
from validator.state import STATE_FILENAME, ValidatorState

__all__ = ["SUMMARY_KEYS", "Leaderboard", "MinerInfo", "MinerRow", "build_leaderboard", "read_validator_state"]

SUMMARY_KEYS = ("uid", "hotkey", "detector", "answered", "accuracy", "real_accuracy", "fake_accuracy", "mcc",
                "video_answers", "video_accuracy", "video_mcc", "score", "weight")


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
    real_accuracy: float | None  # share of the kept real challenges answered real (None before any)
    fake_accuracy: float | None  # share of the kept AI-generated challenges answered AI-generated (None before any)
    mcc: float
    score: float
    weight: float
    video_answers: int = 0  # valid answers to clip challenges kept in the video history
    video_accuracy: float | None = None  # over that history (None before any)
    video_mcc: float | None = None

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
        width = max([16, *(len(row.detector) for row in self.rows)])  # a label is never cut (camo_thumbnails+index)
        header = (
            f"{'rank':>4}  {'uid':>3}  {'detector':<{width}} {'answered':>9}  {'accuracy':>8}  {'real ok':>7}  "
            f"{'fake ok':>7}  {'MCC':>6}  {'score':>6}  {'weight':>6}"
        )
        lines = [title] if title else []
        lines += [header, "-" * len(header)]
        for rank, row in enumerate(self.rows, start=1):
            weight = f"{row.weight:6.3f}" if self.weights_set else f"{'-':>6}"
            lines.append(
                f"{rank:>4}  {row.uid:>3}  {row.detector:<{width}} {f'{row.answered}/{row.queried}':>9}  "
                f"{row.accuracy:8.3f}  {_share(row.real_accuracy)}  {_share(row.fake_accuracy)}  {row.mcc:+6.3f}  "
                f"{row.score:6.3f}  {weight}"
            )
        if not self.weights_set:
            lines.append("(no weights on chain yet)")
        video = [f"uid {row.uid} {row.video_accuracy:.3f} acc {row.video_mcc:+.3f} MCC ({row.video_answers} clips)"
                 for row in self.rows if row.video_accuracy is not None]
        if video:
            lines.append("video: " + ", ".join(video))
        return "\n".join(lines)


def _share(value: float | None) -> str:
    return f"{'-':>7}" if value is None else f"{value:7.3f}"


def _accuracy_per_label(history: Sequence[tuple[int, float]]) -> tuple[float | None, float | None]:
    """(real, AI-generated) share answered right over a kept history: shows which half of the challenges a miner
    gets right (e.g. a retrieval index answers real ones); None for a label not seen yet."""
    shares = []
    for label in (0, 1):
        right = [bool(is_generated(probability)) == bool(label) for seen, probability in history if seen == label]
        shares.append(sum(right) / len(right) if right else None)
    return shares[0], shares[1]


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
        record = state.scorer.miners.get(miner.hotkey) if stats is not None else None
        real, fake = _accuracy_per_label(record.history if record else [])
        rows.append(
            MinerRow(
                uid=miner.uid,
                hotkey=miner.hotkey,
                detector=miner.detector,
                answered=stats.answered if stats else 0,
                queried=stats.queried if stats else 0,
                accuracy=stats.accuracy if stats else 0.0,
                real_accuracy=real,
                fake_accuracy=fake,
                mcc=stats.mcc if stats else 0.0,
                score=stats.score if stats else 0.0,
                weight=float(weights.get(miner.uid, 0.0)),
                video_answers=stats.video_history_len if stats else 0,
                video_accuracy=stats.video_accuracy if stats and stats.video_history_len else None,
                video_mcc=stats.video_mcc if stats and stats.video_history_len else None,
            )
        )
    rows.sort(key=lambda row: (-row.score, row.uid))
    return Leaderboard(rounds=state.scorer.step if state else 0, rows=tuple(rows), weights_set=bool(weights))
