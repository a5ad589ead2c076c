"""How miners do on each kind of challenge: rolling binary accuracy per kind and the quality of returned masks.

For operators only (the per-step log line and the heartbeat): rewards and weights never read it. Each kind keeps its
last `window` challenges; a challenge adds how many valid answers it got and how many were right (the 0.5 decision
rule), and, for miners that returned a usable mask, its IoU and F1 against the challenge's truth mask.
"""

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from bitmind.protocol import is_generated
from validator.challenges.mix import KINDS
from validator.mask_score import MaskScore
from validator.reward import AnswerKind, classify_answer

__all__ = ["ChallengeStats", "StepTally", "tally_step"]

DEFAULT_WINDOW = 100


@dataclass(frozen=True)
class StepTally:
    """One challenge's figures: valid answers, right answers, masks returned (usable) and their summed IoU / F1."""

    answers: int = 0
    correct: int = 0
    masks: int = 0
    iou_sum: float = 0.0
    f1_sum: float = 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answers if self.answers else None


def tally_step(
    label: int, predictions: Sequence[object], statuses: Sequence[int], mask_scores: Sequence[MaskScore | None]
) -> StepTally:
    """Count one challenge's answers: only valid answers (as the reward classifies them) count for accuracy."""
    answers = correct = 0
    for prediction, status in zip(predictions, statuses, strict=True):
        kind, value = classify_answer(prediction, status)
        if kind is AnswerKind.VALID:
            answers += 1
            correct += int(bool(is_generated(value)) == bool(label))
    usable = [score for score in mask_scores if score is not None]
    return StepTally(
        answers, correct, len(usable), sum(score.iou for score in usable), sum(score.f1 for score in usable)
    )


def _mean(total: float, count: int) -> float | None:
    return total / count if count else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class ChallengeStats:
    """Rolling per-kind figures over the last `window` challenges of each kind."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._steps: dict[str, deque[StepTally]] = {kind: deque(maxlen=window) for kind in KINDS}

    def record(self, kind: str, tally: StepTally) -> None:
        if kind not in self._steps:
            raise ValueError(f"unknown challenge kind {kind!r}; kinds are {KINDS}")
        self._steps[kind].append(tally)

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Per kind: challenges, valid answers, accuracy, usable masks, mean mask IoU and F1 (None: no data)."""
        out = {}
        for kind, steps in self._steps.items():
            answers, correct = sum(s.answers for s in steps), sum(s.correct for s in steps)
            masks = sum(s.masks for s in steps)
            out[kind] = {
                "challenges": len(steps),
                "answers": answers,
                "accuracy": _mean(correct, answers),
                "masks": masks,
                "mask_iou": _mean(sum(s.iou_sum for s in steps), masks),
                "mask_f1": _mean(sum(s.f1_sum for s in steps), masks),
            }
        return out

    def format(self) -> str:
        """`acc real=0.912 synthetic=0.750 semi-synthetic=- | mask_iou ...`: rolling figures for the step log line."""
        summary = self.summary()
        accuracy = " ".join(f"{kind}={_fmt(summary[kind]['accuracy'])}" for kind in KINDS)
        iou = " ".join(f"{kind}={_fmt(summary[kind]['mask_iou'])}" for kind in KINDS)
        return f"acc {accuracy} | mask_iou {iou}"
