"""Scorer (histories by hotkey, EMA by uid, weights) and its persistent state file."""

import json
import logging
import os

import numpy as np
import pytest

from bitmind.chain.base import MetagraphView
from bitmind.config import build_config, new_parser
from validator.reward import AnswerKind
from validator.scoring import Scorer, add_scoring_args
from validator.state import STATE_FILENAME, STATE_FORMAT_VERSION, ScorerState, StateStore
from tests._killed_writer import kill_a_writer_of
from validator.weight_setter import add_weight_args

NETUID = 34


def _metagraph(hotkeys, uids=None):
    uids = list(range(len(hotkeys))) if uids is None else uids
    return MetagraphView(netuid=NETUID, block=1, uids=uids, hotkeys=list(hotkeys))


def _scorer(hotkeys=("hk0", "hk1", "hk2"), **params):
    scorer = Scorer(**params)
    scorer.sync(_metagraph(hotkeys))
    return scorer


# --- EMA -------------------------------------------------------------------------------------------------------
def test_ema_arithmetic_and_unqueried_uids_keep_score():
    scorer = _scorer()
    # step 1, label 1: uid0 answers .9 -> history [(1,.9)]: one class, MCC 0, accuracy 1 -> reward 0.5
    #                  uid1 answers .1 -> accuracy 0 -> reward 0
    rewards = scorer.score_challenge(1, [0, 1], [0.9, 0.1])
    assert [r.value for r in rewards] == pytest.approx([0.5, 0.0])
    # score = 0.05*0.5 + 0.95*0 = 0.025
    assert scorer.scores.tolist() == pytest.approx([0.025, 0.0, 0.0])
    # step 2, label 0: uid0 answers .1 -> labels 1 0, preds 1 0: MCC 1, accuracy 1 -> reward 1
    # score = 0.05*1 + 0.95*0.025 = 0.07375; uid1 and uid2 not queried: unchanged
    scorer.score_challenge(0, [0], [0.1])
    assert scorer.scores.tolist() == pytest.approx([0.07375, 0.0, 0.0])
    assert scorer.step == 2


def test_alpha_one_makes_score_the_last_reward():
    scorer = _scorer(alpha=1.0)
    scorer.score_challenge(1, [0], [0.9])
    scorer.score_challenge(0, [0], [0.1])
    assert scorer.scores[0] == pytest.approx(1.0)
    scorer.score_challenge(0, [0], [float("nan")])
    assert scorer.scores[0] == 0.0


def test_hostile_answers_through_the_scorer():
    scorer = _scorer()
    scorer.score_challenge(1, [0, 1, 2], [0.9, 0.9, 0.9])
    before = [scorer.history(uid) for uid in range(3)]
    rewards = scorer.score_challenge(0, [0, 1, 2], [float("inf"), "0.1", 0.1], statuses=[200, 200, 408])
    assert [r.kind for r in rewards] == [AnswerKind.INVALID, AnswerKind.INVALID, AnswerKind.NO_ANSWER]
    assert [r.value for r in rewards] == [0.0, 0.0, 0.0]
    assert [scorer.history(uid) for uid in range(3)] == before
    stats = scorer.stats(0)
    assert (stats.queried, stats.answered, stats.invalid) == (2, 1, 1)
    assert scorer.stats(2).invalid == 0 and scorer.stats(2).answered == 1


def test_history_is_capped_at_the_longest_window():
    scorer = _scorer(("hk0",))
    for i in range(150):
        scorer.score_challenge(i % 2, [0], [0.9 if i % 2 else 0.1])
    assert len(scorer.history(0)) == 100
    assert scorer.stats(0).history_len == 100
    assert scorer.stats(0).queried == 150


@pytest.mark.parametrize(
    ("uids", "predictions", "statuses", "match"),
    [
        ([0, 1], [0.5], None, "predictions"),
        ([0], [0.5], [200, 200], "statuses"),
        ([0, 0], [0.5, 0.5], None, "twice"),
        ([7], [0.5], None, "not in the last synced metagraph"),
    ],
)
def test_caller_errors_raise_clearly(uids, predictions, statuses, match):
    scorer = _scorer()
    with pytest.raises(ValueError, match=match):
        scorer.score_challenge(1, uids, predictions, statuses)
    assert scorer.step == 0


@pytest.mark.parametrize("params", [{"alpha": 0.0}, {"alpha": 1.5}, {"history_mcc": 0}, {"history_acc": 2.5}])
def test_bad_parameters_rejected(params):
    with pytest.raises(ValueError):
        Scorer(**params)


# --- sync ------------------------------------------------------------------------------------------------------
def _train(scorer, uids):
    scorer.score_challenge(1, uids, [0.9] * len(uids))
    scorer.score_challenge(0, uids, [0.1] * len(uids))


def test_hotkey_change_zeroes_uid_and_history_only():
    scorer = _scorer()
    _train(scorer, [0, 1, 2])
    scores = scorer.scores
    replaced = scorer.sync(_metagraph(["hk0", "new1", "hk2"]))
    assert replaced == [1]
    assert scorer.scores[1] == 0.0
    assert scorer.history(1) == []
    assert scorer.stats(1).queried == 0 and scorer.stats(1).hotkey == "new1"
    assert scorer.scores[[0, 2]].tolist() == scores[[0, 2]].tolist()
    assert len(scorer.history(0)) == 2 and len(scorer.history(2)) == 2
    assert "hk1" not in scorer.snapshot().miners


def test_same_metagraph_changes_nothing():
    scorer = _scorer()
    _train(scorer, [0, 1])
    snapshot = scorer.snapshot()
    assert scorer.sync(_metagraph(["hk0", "hk1", "hk2"])) == []
    assert scorer.snapshot() == snapshot


def test_metagraph_growth_and_shrink():
    scorer = _scorer()
    _train(scorer, [0, 1, 2])
    scores = scorer.scores
    scorer.sync(_metagraph(["hk0", "hk1", "hk2", "hk3", "hk4"]))
    assert len(scorer.scores) == 5
    assert scorer.scores[:3].tolist() == scores.tolist() and scorer.scores[3:].tolist() == [0.0, 0.0]
    scorer.score_challenge(1, [4], [0.9])
    scorer.sync(_metagraph(["hk0", "hk1"]))
    assert scorer.scores.tolist() == scores[:2].tolist()
    assert set(scorer.snapshot().miners) == {"hk0", "hk1"}
    with pytest.raises(ValueError):
        scorer.score_challenge(1, [4], [0.9])


def test_uid_missing_then_taken_by_a_new_hotkey_starts_at_zero():
    scorer = _scorer()
    _train(scorer, [0, 1, 2])
    assert scorer.sync(_metagraph(["hk0", "hk2"], uids=[0, 2])) == []
    assert scorer.uids == [0, 2] and scorer.scores[1] == 0.0
    assert scorer.sync(_metagraph(["hk0", "new1", "hk2"])) == [1]
    assert scorer.scores[1] == 0.0 and scorer.history(1) == []
    assert len(scorer.history(0)) == 2


def test_sparse_uids_and_bad_metagraph():
    scorer = Scorer()
    scorer.sync(_metagraph(["a", "c"], uids=[0, 2]))
    assert scorer.uids == [0, 2]
    with pytest.raises(ValueError):
        scorer.score_challenge(1, [1], [0.5])
    with pytest.raises(ValueError, match="hotkeys"):
        scorer.sync(MetagraphView(netuid=NETUID, block=1, uids=[0, 1], hotkeys=["a"]))
    with pytest.raises(ValueError, match="non-negative"):
        scorer.sync(_metagraph(["a"], uids=[-1]))


# --- weights ---------------------------------------------------------------------------------------------------
def test_weights_are_l1_normalised_scores():
    scorer = _scorer(alpha=1.0)
    scorer.score_challenge(1, [0, 1], [0.9, 0.1])  # rewards 0.5 and 0
    scorer.score_challenge(0, [0, 2], [0.1, 0.1])  # uid0: MCC 1 acc 1 -> 1; uid2: one class, acc 1 -> 0.5
    uids, weights = scorer.weights()
    assert uids == [0, 1, 2]
    assert weights == pytest.approx([1 / 1.5, 0.0, 0.5 / 1.5])


def test_weights_are_paid_only_among_the_uids_given():
    scorer = _scorer(alpha=1.0)
    scorer.score_challenge(1, [0, 1], [0.9, 0.9])  # both 0.5
    assert scorer.weights(among=[1, 2]) == ([0, 1, 2], pytest.approx([0.0, 1.0, 0.0]))
    assert scorer.weights(among=[2]) == ([0, 1, 2], pytest.approx([0.0, 0.0, 1.0]))  # all zero among them: uniform
    assert scorer.weights(among=[]) == scorer.weights()  # nobody to pay: as if unrestricted


def test_all_zero_scores_give_uniform_weights_and_no_uids_give_none():
    assert _scorer(("a", "b", "c", "d")).weights() == ([0, 1, 2, 3], pytest.approx([0.25] * 4))
    assert Scorer().weights() == ([], [])


def test_all_stats_sorted_by_score():
    scorer = _scorer()
    scorer.score_challenge(1, [1, 2], [0.9, 0.1])
    stats = scorer.all_stats()
    assert [s.uid for s in stats] == [1, 0, 2]
    assert stats[0].accuracy == 1.0 and stats[0].mcc == 0.0 and stats[0].answered == 1


# --- flags -----------------------------------------------------------------------------------------------------
def test_flags_reach_the_scorer():
    parser = new_parser("test")
    add_scoring_args(parser)
    add_weight_args(parser)
    config = build_config(parser, ["--neuron.alpha", "0.2", "--neuron.history_mcc", "50", "--neuron.history_acc", "5"])
    params = Scorer.from_config(config).params
    assert (params.alpha, params.history_mcc, params.history_acc) == (0.2, 50, 5)
    defaults = Scorer.from_config(build_config(parser, [])).params
    assert (defaults.alpha, defaults.history_mcc, defaults.history_acc) == (0.05, 100, 10)


# --- state file ------------------------------------------------------------------------------------------------
@pytest.fixture()
def store(tmp_path):
    return StateStore.in_dir(tmp_path, NETUID)


def _trained_scorer():
    scorer = _scorer()
    _train(scorer, [0, 1])
    scorer.score_challenge(1, [0, 2], [0.3, -1])
    return scorer


def test_save_load_round_trip(store):
    scorer = _trained_scorer()
    assert store.load() is None
    assert store.save(scorer.snapshot(), last_weights_block=1234)
    state = StateStore(store.path, NETUID).load()
    assert state.format_version == STATE_FORMAT_VERSION
    assert state.last_weights_block == 1234
    assert state.scorer == scorer.snapshot()


def test_restart_keeps_scores_and_histories(store):
    scorer = _trained_scorer()
    store.load()
    store.save(scorer.snapshot())
    restarted_store = StateStore.in_dir(store.path.parent, NETUID)
    restarted = Scorer.from_snapshot(restarted_store.load().scorer)
    restarted.sync(_metagraph(["hk0", "hk1", "hk2"]))
    assert restarted.scores.tolist() == scorer.scores.tolist()
    assert [restarted.history(uid) for uid in range(3)] == [scorer.history(uid) for uid in range(3)]
    assert restarted.step == scorer.step
    assert restarted.weights() == scorer.weights()
    # the next answer continues the old history: labels 1 0 1 + 1, preds 1 0 0 + 1
    # TP=2 TN=1 FN=1 FP=0: MCC = 2/sqrt(2*3*1*2) = 1/sqrt(3); accuracy 3/4
    reward = restarted.score_challenge(1, [0], [0.9])[0]
    assert reward.value == pytest.approx(0.5 / np.sqrt(3) + 0.375)


def test_from_config_with_snapshot_and_smaller_window(store):
    scorer = _scorer(("hk0",))
    for i in range(30):
        scorer.score_challenge(i % 2, [0], [0.9])
    parser = new_parser("test")
    add_scoring_args(parser)
    config = build_config(parser, ["--neuron.history_mcc", "8", "--neuron.history_acc", "4"])
    restored = Scorer.from_config(config, scorer.snapshot())
    assert restored.history(0) == scorer.history(0)[-8:]


def test_save_before_load_refused(store):
    with pytest.raises(RuntimeError, match="before load"):
        store.save(ScorerState())
    assert not store.path.exists()


def _valid_state_text():
    scorer = _trained_scorer()
    return json.dumps(
        {
            "format_version": STATE_FORMAT_VERSION,
            "netuid": NETUID,
            "saved_at": 0.0,
            "last_weights_block": None,
            "scorer": json.loads(scorer.snapshot().model_dump_json()),
        }
    )


def _edited(edit):
    state = json.loads(_valid_state_text())
    edit(state)
    return json.dumps(state).encode()


BAD_FILES = {
    "empty": b"",
    "truncated": _valid_state_text().encode()[:200],
    "garbage_binary": bytes(range(256)) * 8,
    "not_an_object": b"[1, 2, 3]",
    "deeply_nested": b"[" * 100000,
    "wrong_version": _edited(lambda s: s.update(format_version=STATE_FORMAT_VERSION + 1)),
    "no_version": _edited(lambda s: s.pop("format_version")),
    "other_netuid": _edited(lambda s: s.update(netuid=NETUID + 1)),
    "label_out_of_range": _edited(lambda s: s["scorer"]["miners"]["hk0"]["history"].append([2, 0.5])),
    "prediction_out_of_range": _edited(lambda s: s["scorer"]["miners"]["hk0"]["history"].append([1, 1.5])),
    "prediction_as_string": _edited(lambda s: s["scorer"]["miners"]["hk0"]["history"].append([1, "0.5"])),
    "label_as_bool": _edited(lambda s: s["scorer"]["miners"]["hk0"]["history"].append([True, 0.5])),
    "nan_score": _valid_state_text().replace('"scores": [', '"scores": [NaN, ').encode(),
    "scores_hotkeys_mismatch": _edited(lambda s: s["scorer"]["scores"].append(0.1)),
    "negative_step": _edited(lambda s: s["scorer"].update(step=-1)),
    "unknown_field": _edited(lambda s: s.update(pickle="cos\nsystem\n")),
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_unusable_file_moved_aside_and_fresh_start(store, content, caplog):
    store.path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="validator.state"):
        assert store.load() is None
    assert "unusable" in caplog.text
    assert not store.path.exists()
    aside = list(store.path.parent.glob(f"{STATE_FILENAME}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    scorer = _trained_scorer()
    assert store.save(scorer.snapshot())
    assert StateStore(store.path, NETUID).load().scorer == scorer.snapshot()


def test_directory_in_place_of_the_file_is_moved_aside(store, caplog):
    store.path.mkdir()
    with caplog.at_level(logging.WARNING, logger="validator.state"):
        assert store.load() is None
    assert "unusable" in caplog.text
    assert store.save(ScorerState())


def test_oversized_file_is_moved_aside(tmp_path):
    store = StateStore(tmp_path / "state.json", NETUID, max_bytes=100)
    store.path.write_text(_valid_state_text())
    assert store.load() is None
    assert list(tmp_path.glob("state.json.corrupt-*"))


def test_failed_rename_leaves_old_file_intact(store, monkeypatch, caplog):
    store.load()
    store.save(_trained_scorer().snapshot(), last_weights_block=7)
    old = store.path.read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("validator.state.os.replace", crash)
    with caplog.at_level(logging.ERROR, logger="validator.state"):
        assert store.save(ScorerState(), last_weights_block=8) is False
    assert "could not save" in caplog.text
    assert store.path.read_bytes() == old
    assert [p.name for p in store.path.parent.iterdir()] == [STATE_FILENAME]


def test_crash_between_write_and_rename_keeps_old_state(store):
    store.load()
    scorer = _trained_scorer()
    store.save(scorer.snapshot())
    # what a killed process leaves behind: a half-written temporary file next to the intact state file
    leftover = kill_a_writer_of(store.path, _valid_state_text()[:50])
    restarted = StateStore(store.path, NETUID)
    assert restarted.load().scorer == scorer.snapshot()
    assert not leftover.exists()


def test_temp_file_is_synced_before_rename(store, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr("validator.state.os.fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        "validator.state.os.replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    store.load()
    assert store.save(ScorerState())
    assert events.index("fsync") < events.index("replace")
