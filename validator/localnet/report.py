"""What the local subnet shows: the leaderboard with the validator's accuracy per challenge kind (and per clip
kind), live in the terminal and in the `--summary` file.

Why apart from the run: the figures come from files the validator writes (its state and heartbeat), so rendering
them needs nothing that is running.
"""

import json
from pathlib import Path
from typing import Any

from validator.challenges.mix import KINDS
from validator.leaderboard import Leaderboard

HEARTBEAT_FILE = "heartbeat.json"


def kind_stats(validator_state: Path, key: str = "kinds") -> dict[str, Any]:
    """The validator's rolling accuracy (and mask IoU) per challenge kind, from its heartbeat (`video_kinds`:
    of the clip challenges); {} before one."""
    try:
        beat = json.loads((validator_state / HEARTBEAT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    kinds = beat.get(key) if isinstance(beat, dict) else None
    return kinds if isinstance(kinds, dict) else {}


def kind_line(kinds: dict[str, Any]) -> str:
    """`miners' accuracy by kind: real 0.91 (20 challenges), ...` from the validator heartbeat's `kinds`; "" while
    no challenge has been scored."""
    shown = []
    for kind in KINDS:
        row = kinds.get(kind)
        if isinstance(row, dict) and isinstance(row.get("challenges"), int) and row["challenges"] > 0:
            accuracy = row.get("accuracy")
            figure = f"{accuracy:.2f}" if isinstance(accuracy, (int, float)) else "-"
            shown.append(f"{kind} {figure} ({row['challenges']} challenges)")
    return "miners' accuracy by kind: " + ", ".join(shown) if shown else ""


def clip_line(video_kinds: dict[str, Any]) -> str:
    """`miners' accuracy on clips by kind: real 0.80 (5 clips), ...` from the heartbeat's `video_kinds`; "" while
    no clip has been scored."""
    clips = [f"{kind} {row['accuracy']:.2f} ({row['challenges']} clips)" for kind, row in video_kinds.items()
             if isinstance(row, dict) and row.get("challenges") and isinstance(row.get("accuracy"), (int, float))]
    return "miners' accuracy on clips by kind: " + ", ".join(clips) if clips else ""


def board_text(board: Leaderboard, header: str, validator_state: Path) -> str:
    """The board under `header`, then the per-kind and per-clip-kind lines that have figures."""
    lines = [board.render(header), kind_line(kind_stats(validator_state)),
             clip_line(kind_stats(validator_state, "video_kinds"))]
    return "\n".join(line for line in lines if line)


def write_summary(path: Path, board: Leaderboard, validator_state: Path) -> None:
    """The final board as JSON with the per-kind figures (raises OSError when it cannot be written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {**board.summary(), "kinds": kind_stats(validator_state),
               "video_kinds": kind_stats(validator_state, "video_kinds")}
    path.write_text(json.dumps(summary, indent=2) + "\n")
