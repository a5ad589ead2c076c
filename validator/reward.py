"""Per-challenge reward of one miner's answer: the subnet's judge, exact and never raising on miner input.

The rule (reference subnet 34, made explicit):

    reward = (0.5 * max(0, MCC over the last `history_mcc` valid predictions)
              + 0.5 * accuracy over the last `history_acc` valid predictions) * penalty

Decisions, each tested in tests/test_reward.py:
- A valid answer is an int or a float (numpy numbers included) that is finite and in [0, 1]. Anything else is
  invalid and takes penalty 0: NaN, +-inf, out-of-range numbers, bools, None, strings (even numeric ones such as
  "0.7": a miner that answers with text broke the protocol), lists, dicts, ...
- A non-answer is a prediction of exactly -1 (the protocol's "no answer"), or a transport status other than 200
  (timeouts, refusals, blacklists, handler errors). It scores 0.
- Only valid answers join the history. Non-answers and invalid answers score 0 and leave it untouched, so a
  protocol breach costs that step's reward but never poisons the miner's MCC/accuracy windows.
- The current valid answer joins the history BEFORE the windows are read (as the reference does), so one answer
  always counts in its own reward.
- Predictions are thresholded at 0.5: strictly greater than 0.5 means "AI-generated" (label 1); 0.5 itself is "real".
- MCC is 0 when the window holds a single class of true labels or of thresholded predictions: the denominator of
  the MCC is then 0. scikit-learn returns 0 in that case too (with a warning); we short-circuit to say it openly.
- MCC and accuracy come from the window's confusion counts, computed directly: scikit-learn's input validation
  cost ~5 ms per miner (over a second per step at 256 miners), so it stays the tests' oracle instead.
"""

import enum
import math
import numbers
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

from bitmind.protocol import is_generated

__all__ = [
    "DEFAULT_HISTORY_ACC",
    "DEFAULT_HISTORY_MCC",
    "AnswerKind",
    "Reward",
    "classify_answer",
    "compute_reward",
    "window_metrics",
    "window_reward",
]

DEFAULT_HISTORY_MCC = 100
DEFAULT_HISTORY_ACC = 10
OK_STATUS = 200
NO_ANSWER_VALUE = -1

# One entry of a miner's history: (true label 0/1, the miner's probability in [0, 1]).
Entry = tuple[int, float]


class AnswerKind(str, enum.Enum):
    VALID = "valid"
    NO_ANSWER = "no_answer"  # -1, timeout, non-200 status: scored 0, history untouched
    INVALID = "invalid"  # protocol breach (penalty 0): scored 0, history untouched


@dataclass(frozen=True)
class Reward:
    """One miner's reward for one challenge, with the window figures it was computed from (0 when not valid)."""

    value: float
    kind: AnswerKind
    mcc: float = 0.0
    accuracy: float = 0.0


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def classify_answer(prediction: object, status: object = OK_STATUS) -> tuple[AnswerKind, float | None]:
    """Sort a miner's answer into valid / no answer / invalid; the float is returned only when valid."""
    if not (_is_number(status) and status == OK_STATUS):
        return AnswerKind.NO_ANSWER, None
    if not _is_number(prediction):
        return AnswerKind.INVALID, None
    try:
        value = float(prediction)  # type: ignore[arg-type]
    except (OverflowError, TypeError, ValueError):  # e.g. an int too large for a float
        return AnswerKind.INVALID, None
    if value == NO_ANSWER_VALUE:
        return AnswerKind.NO_ANSWER, None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        return AnswerKind.INVALID, None
    return AnswerKind.VALID, value


def _mcc(tp: int, fp: int, fn: int, tn: int) -> float:
    """MCC from confusion counts, 0 when either side holds one class only (zero denominator)."""
    denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    if denominator == 0:
        return 0.0
    return (tp * tn - fp * fn) / math.sqrt(denominator)


def window_metrics(history: Sequence[Entry], window: int | None = None) -> tuple[float, float]:
    """(MCC, accuracy) over the last `window` entries of `history` (all of it when None); (0, 0) when empty."""
    size = len(history)
    start = 0 if window is None else max(0, size - window)
    tp = fp = fn = tn = 0
    for label, probability in islice(history, start, None):
        if is_generated(probability):
            if label == 1:
                tp += 1
            else:
                fp += 1
        elif label == 1:
            fn += 1
        else:
            tn += 1
    total = tp + fp + fn + tn
    if not total:
        return 0.0, 0.0
    return _mcc(tp, fp, fn, tn), (tp + tn) / total


def compute_reward(
    label: int,
    prediction: object,
    history: deque[Entry],
    status: object = OK_STATUS,
    history_mcc: int = DEFAULT_HISTORY_MCC,
    history_acc: int = DEFAULT_HISTORY_ACC,
) -> Reward:
    """Score one answer to a challenge whose true label is `label` (0 real, 1 AI-generated).

    A valid answer is appended to `history` (the caller's rolling deque) first, then the reward is read from the
    windows. `label` comes from the validator itself, so a bad one is a bug and raises ValueError; nothing a miner
    sends can make this raise.
    """
    if isinstance(label, bool) or label not in (0, 1):
        raise ValueError(f"challenge label must be 0 (real) or 1 (AI-generated), got {label!r}")
    kind, value = classify_answer(prediction, status)
    if value is None:
        return Reward(0.0, kind)
    history.append((int(label), value))
    reward, mcc, accuracy = window_reward(history, history_mcc, history_acc)
    return Reward(reward, kind, mcc, accuracy)


def window_reward(
    history: Sequence[Entry], history_mcc: int = DEFAULT_HISTORY_MCC, history_acc: int = DEFAULT_HISTORY_ACC
) -> tuple[float, float, float]:
    """(0.5 * max(0, MCC) + 0.5 * accuracy, MCC, accuracy) over a history's two windows; 0s when it is empty."""
    mcc, _ = window_metrics(history, history_mcc)
    _, accuracy = window_metrics(history, history_acc)
    return 0.5 * max(0.0, mcc) + 0.5 * accuracy, mcc, accuracy
