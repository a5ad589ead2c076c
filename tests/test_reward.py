"""The reward rule against hand-computed histories, its windows, and every hostile answer a miner can send.

MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); predictions > 0.5 mean "AI-generated" (1).
"""

import math
from collections import deque
from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef

from validator.reward import AnswerKind, classify_answer, compute_reward, window_metrics


def _history(entries):
    return deque(entries)


def test_four_answers_with_balanced_confusion_matrix():
    # labels 1 1 0 0, predictions .9 .4 .2 + current .7 -> thresholded 1 0 0 1
    # TP=1 FN=1 TN=1 FP=1: MCC = (1*1 - 1*1) / sqrt(2*2*2*2) = 0, accuracy 2/4 -> reward 0.5*0 + 0.5*0.5 = 0.25
    history = _history([(1, 0.9), (1, 0.4), (0, 0.2)])
    reward = compute_reward(0, 0.7, history)
    assert reward.kind is AnswerKind.VALID
    assert reward.mcc == pytest.approx(0.0)
    assert reward.accuracy == pytest.approx(0.5)
    assert reward.value == pytest.approx(0.25)


def test_five_answers_known_mcc():
    # labels 1 1 1 0 0, predictions .9 .8 .3 .1 + current .6 -> 1 1 0 0 1
    # TP=2 FN=1 TN=1 FP=1: MCC = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6, accuracy 3/5
    # reward = 0.5/6 + 0.5*0.6 = 0.38333...
    history = _history([(1, 0.9), (1, 0.8), (1, 0.3), (0, 0.1)])
    reward = compute_reward(0, 0.6, history)
    assert reward.mcc == pytest.approx(1 / 6)
    assert reward.accuracy == pytest.approx(0.6)
    assert reward.value == pytest.approx(0.5 / 6 + 0.3)
    assert reward.mcc == pytest.approx(matthews_corrcoef([1, 1, 1, 0, 0], [1, 1, 0, 0, 1]))


def test_negative_mcc_is_clipped_to_zero():
    # labels 1 0, predictions .2 .8 -> 0 1: TP=TN=0, FP=FN=1: MCC = -1 -> max(0, -1) = 0; accuracy 0 -> reward 0
    history = _history([(1, 0.2)])
    reward = compute_reward(0, 0.8, history)
    assert reward.mcc == pytest.approx(-1.0)
    assert reward.value == 0.0


def test_perfect_answers_earn_one():
    reward = compute_reward(0, 0.1, _history([(1, 0.9)]))
    assert (reward.mcc, reward.accuracy, reward.value) == pytest.approx((1.0, 1.0, 1.0))


def test_current_answer_joins_history_before_reward():
    # An empty history: the answer itself is the whole window -> accuracy 1 (one class: MCC 0) -> 0.5
    history = deque()
    reward = compute_reward(1, 0.9, history)
    assert list(history) == [(1, 0.9)]
    assert reward.value == pytest.approx(0.5)


def test_threshold_half_means_real():
    # 0.5 is not > 0.5: predicted "real"; labels 1 0, predictions .9 .5 -> 1 0: perfect
    reward = compute_reward(0, 0.5, _history([(1, 0.9)]))
    assert reward.accuracy == 1.0 and reward.mcc == pytest.approx(1.0)


def test_single_class_labels_give_mcc_zero():
    # labels 1 1 1, predictions .9 .1 .9 -> 1 0 1: one true class -> MCC 0; accuracy 2/3 -> reward 1/3
    reward = compute_reward(1, 0.9, _history([(1, 0.9), (1, 0.1)]))
    assert reward.mcc == 0.0
    assert reward.value == pytest.approx(1 / 3)


def test_single_class_predictions_give_mcc_zero():
    # labels 1 0 1, predictions all .9 -> 1 1 1: one predicted class -> MCC 0; accuracy 2/3
    reward = compute_reward(1, 0.9, _history([(1, 0.9), (0, 0.9)]))
    assert reward.mcc == 0.0
    assert reward.accuracy == pytest.approx(2 / 3)
    assert reward.value == pytest.approx(1 / 3)


def _alternating_correct(count, first_label):
    """`count` correct answers with labels first_label, 1-first_label, ..."""
    entries = []
    for i in range(count):
        label = (first_label + i) % 2
        entries.append((label, 0.9 if label else 0.1))
    return entries


def test_accuracy_window_is_exactly_last_ten():
    # 11 entries: one wrong (label 1, pred .1) then 10 correct -> the wrong one is the 11th from the end: acc = 1.
    # Correct: 9 prefilled labels 0 1 0 1 0 1 0 1 0 + current label 1 -> TN=5, TP=5; wrong one: FN=1, FP=0.
    # MCC over all 11 = (5*5 - 0) / sqrt(5*6*5*6) = 25/30 = 5/6; reward = 0.5*5/6 + 0.5*1 = 11/12
    history = _history([(1, 0.1)] + _alternating_correct(9, 0))
    reward = compute_reward(1, 0.9, history)
    assert reward.accuracy == 1.0
    assert reward.mcc == pytest.approx(5 / 6)
    assert reward.value == pytest.approx(11 / 12)


def test_accuracy_window_includes_tenth_from_end():
    # 10 entries: wrong (label 1, pred .1), 8 correct labels 0 1 0 1 0 1 0 1, current label 1 correct.
    # TP=5 TN=4 FN=1 FP=0: MCC = (5*4 - 0) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 20 / sqrt(5*6*4*5)
    #   = 20/sqrt(600) = 2/sqrt(6); accuracy 9/10; reward = 0.5*2/sqrt(6) + 0.5*0.9
    history = _history([(1, 0.1)] + _alternating_correct(8, 0))
    reward = compute_reward(1, 0.9, history)
    assert reward.accuracy == pytest.approx(0.9)
    assert reward.mcc == pytest.approx(2 / math.sqrt(6))
    assert reward.value == pytest.approx(1 / math.sqrt(6) + 0.45)


def test_mcc_window_is_exactly_last_hundred():
    # 101 entries: one wrong (label 0, pred .9) then 100 correct: the wrong one falls out -> MCC 1, reward 1
    history = _history([(0, 0.9)] + _alternating_correct(99, 1))
    assert compute_reward(0, 0.1, history).value == pytest.approx(1.0)


def test_mcc_window_includes_hundredth_from_end():
    # 100 entries: wrong (label 0, pred .9) = FP, then 99 correct with labels 1 0 1 ... 1: TP=50, TN=49.
    # MCC = 50*49 / sqrt(51*50*50*49) = 49/sqrt(2499); accuracy over the last 10 = 1
    history = _history([(0, 0.9)] + _alternating_correct(98, 1))
    reward = compute_reward(1, 0.9, history)
    assert reward.mcc == pytest.approx(49 / math.sqrt(2499))
    assert reward.value == pytest.approx(0.5 * 49 / math.sqrt(2499) + 0.5)


def test_custom_windows():
    # accuracy over the last 2: labels 1 0 / preds .9 .9 -> 1/2; MCC over the last 3: labels 0 1 0, preds .1 .9 .9
    # -> TP=1 TN=1 FP=1 FN=0: MCC = (1 - 0) / sqrt(2*1*2*1) = 1/2; reward = 0.25 + 0.25
    history = _history([(1, 0.1), (0, 0.1), (1, 0.9)])
    reward = compute_reward(0, 0.9, history, history_mcc=3, history_acc=2)
    assert reward.mcc == pytest.approx(0.5)
    assert reward.accuracy == pytest.approx(0.5)
    assert reward.value == pytest.approx(0.5)


HOSTILE_INVALID = [
    float("nan"),
    float("inf"),
    float("-inf"),
    -0.5,
    1.2,
    1.0000001,
    -1e-9,
    "0.7",
    "",
    None,
    True,
    False,
    [0.5],
    (0.5,),
    {"prediction": 0.5},
    b"0.5",
    10**400,
    np.float64("nan"),
    np.array([0.5]),
    object(),
]


@pytest.mark.parametrize("answer", HOSTILE_INVALID, ids=repr)
def test_invalid_answer_scores_zero_and_keeps_history(answer):
    history = _history([(1, 0.9), (0, 0.1)])
    before = list(history)
    reward = compute_reward(1, answer, history)
    assert reward.value == 0.0
    assert reward.kind is AnswerKind.INVALID
    assert list(history) == before


@pytest.mark.parametrize(
    ("answer", "status"),
    [(-1, 200), (-1.0, 200), (0.9, 408), (0.9, 503), (0.9, 401), (0.9, 500), (0.9, None), (0.9, "200"), (0.9, True)],
)
def test_non_answer_scores_zero_and_keeps_history(answer, status):
    history = _history([(1, 0.9), (0, 0.1)])
    before = list(history)
    reward = compute_reward(1, answer, history, status=status)
    assert reward.value == 0.0
    assert reward.kind is AnswerKind.NO_ANSWER
    assert list(history) == before


@pytest.mark.parametrize(
    "answer", [0, 1, 0.0, 1.0, 0.25, np.float32(0.75), np.float64(0.5), np.int64(1), Fraction(1, 3)]
)
def test_numbers_in_range_are_valid(answer):
    kind, value = classify_answer(answer)
    assert kind is AnswerKind.VALID
    assert value == pytest.approx(float(answer))
    assert isinstance(value, float)


@pytest.mark.parametrize("label", [2, -1, 0.5, True, None, "1"])
def test_bad_label_is_a_caller_error(label):
    with pytest.raises(ValueError, match="label"):
        compute_reward(label, 0.5, deque())


def test_window_metrics_empty_and_whole():
    assert window_metrics([]) == (0.0, 0.0)
    # labels 1 0 0 / preds .9 .9 .1 -> 1 1 0: TP=1 TN=1 FP=1 FN=0: MCC = 1/sqrt(2*1*2*1) = 1/2, accuracy 2/3
    mcc, accuracy = window_metrics([(1, 0.9), (0, 0.9), (0, 0.1)])
    assert mcc == pytest.approx(0.5) and accuracy == pytest.approx(2 / 3)
