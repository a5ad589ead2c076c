"""The weight setter never stalls its caller, retries a failing chain, and records what it achieved."""

import logging
import threading
import time

import pytest

import bitmind
from bitmind.chain.base import Chain, MetagraphView
from bitmind.config import build_config, new_parser
from validator.weight_setter import WeightSetter, add_weight_args

WAIT = 10.0  # upper bound for any wait in these tests; passing runs take milliseconds


def wait_until(predicate, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class FakeChain(Chain):
    """Scripted answers to set_weights: (ok, msg) tuples, exceptions to raise, or "hang" (until released)."""

    netuid = 34

    def __init__(self, script=(), current_block=1000):
        self.script = list(script)
        self.current_block = current_block
        self.calls = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def block(self):
        return self.current_block

    def sync(self):
        return MetagraphView(netuid=self.netuid, block=self.current_block)

    def register(self, wallet):
        return 0

    def serve_axon(self, wallet, ip, port):
        return None

    def set_weights(self, wallet, uids, weights, version_key):
        self.calls.append((wallet, list(uids), list(weights), version_key))
        self.entered.set()
        step = self.script.pop(0) if self.script else (True, "ok")
        if step == "hang":
            self.release.wait(WAIT)
            return True, "late"
        if isinstance(step, BaseException):
            raise step
        return step


WEIGHTS = ([0, 1, 2], [0.5, 0.3, 0.2])


@pytest.fixture()
def make_setter():
    made = []

    def make(chain, **kwargs):
        kwargs.setdefault("timeout", 5.0)
        kwargs.setdefault("backoff", 0.0)
        setter = WeightSetter(chain, "wallet", lambda: WEIGHTS, **kwargs).start()
        made.append((setter, chain))
        return setter

    yield make
    for setter, chain in made:
        chain.release.set()
        assert setter.stop(timeout=WAIT)


def test_success_records_block_and_passes_spec_version(make_setter, caplog):
    chain = FakeChain()
    setter = make_setter(chain)
    with caplog.at_level(logging.INFO, logger="validator.weight_setter"):
        assert setter.maybe_set_weights(block=1000)
        assert wait_until(lambda: setter.stats.successes == 1 and not setter.stats.in_flight)
    assert chain.calls == [("wallet", [0, 1, 2], [0.5, 0.3, 0.2], bitmind.spec_version)]
    assert setter.last_success_block == 1000
    assert setter.stats.last_ok is True and setter.stats.attempts == 1
    line = [r.getMessage() for r in caplog.records if "weights: set" in r.getMessage()]
    assert len(line) == 1 and "3 uids" in line[0] and "0:0.5000" in line[0] and "ok" in line[0]


def test_not_due_until_epoch_length_blocks_passed(make_setter):
    chain = FakeChain()
    setter = make_setter(chain, epoch_length=100, last_success_block=1000)
    setter.maybe_set_weights(block=1099)
    assert wait_until(lambda: not setter.stats.in_flight)
    assert chain.calls == []
    setter.maybe_set_weights(block=1100)
    assert wait_until(lambda: setter.stats.successes == 1)
    assert setter.last_success_block == 1100


def test_block_from_chain_when_caller_has_none(make_setter):
    chain = FakeChain(current_block=4321)
    setter = make_setter(chain)
    setter.maybe_set_weights()
    assert wait_until(lambda: setter.stats.successes == 1)
    assert setter.last_success_block == 4321


def test_hanging_chain_never_blocks_the_caller(make_setter):
    chain = FakeChain(script=["hang"])
    setter = make_setter(chain, timeout=0.2, retries=0)
    assert setter.maybe_set_weights(block=1000)
    assert chain.entered.wait(WAIT)
    # the chain is hanging right now, and the caller is free: a second request is refused, not queued
    assert setter.stats.in_flight
    assert setter.maybe_set_weights(block=1000) is False
    assert len(chain.calls) == 1
    assert wait_until(lambda: setter.stats.timeouts == 1 and not setter.stats.in_flight)
    assert setter.stats.last_ok is False and "timed out" in setter.stats.last_message
    assert setter.last_success_block is None
    # while the abandoned call still hangs, no new call is started
    assert setter.maybe_set_weights(block=1000)
    assert wait_until(lambda: setter.stats.skipped_hanging == 1 and not setter.stats.in_flight)
    assert len(chain.calls) == 1
    # once it returns, the next request sets weights again
    chain.release.set()
    setter.maybe_set_weights(block=1000)
    assert wait_until(lambda: setter.stats.successes == 1)
    assert len(chain.calls) == 2


def test_failing_chain_is_retried_then_succeeds(make_setter):
    chain = FakeChain(script=[(False, "rate limited"), RuntimeError("connection reset"), (True, "included")])
    setter = make_setter(chain, retries=3)
    setter.maybe_set_weights(block=2000)
    assert wait_until(lambda: setter.stats.successes == 1)
    assert len(chain.calls) == 3
    assert setter.stats.attempts == 3 and setter.stats.failures == 0
    assert setter.stats.last_message == "included" and setter.last_success_block == 2000


def test_failing_chain_gives_up_after_retries_and_logs(make_setter, caplog):
    chain = FakeChain(script=[(False, "nope")] * 2 + [ValueError("bad weights")])
    setter = make_setter(chain, retries=2)
    with caplog.at_level(logging.WARNING, logger="validator.weight_setter"):
        setter.maybe_set_weights(block=3000)
        assert wait_until(lambda: setter.stats.failures == 1 and not setter.stats.in_flight)
    assert len(chain.calls) == 3
    assert setter.stats.last_ok is False and "ValueError: bad weights" in setter.stats.last_message
    assert setter.last_success_block is None
    assert setter.stats.last_attempt_block == 3000
    failed = [r.getMessage() for r in caplog.records if "FAILED" in r.getMessage()]
    assert len(failed) == 1 and "3 tries" in failed[0]
    # a failure is tried again on the next request, even within the epoch
    setter.maybe_set_weights(block=3001)
    assert wait_until(lambda: setter.stats.successes == 1)


def test_malformed_chain_answer_is_a_failure(make_setter):
    chain = FakeChain(script=[None])
    setter = make_setter(chain, retries=0)
    setter.maybe_set_weights(block=1)
    assert wait_until(lambda: setter.stats.failures == 1)
    assert "TypeError" in setter.stats.last_message


def test_broken_weights_fn_is_logged_and_survived(caplog):
    chain = FakeChain()
    calls = iter([RuntimeError("scorer broke"), WEIGHTS])

    def weights_fn():
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    setter = WeightSetter(chain, "wallet", weights_fn, backoff=0.0).start()
    try:
        with caplog.at_level(logging.ERROR, logger="validator.weight_setter"):
            setter.maybe_set_weights(block=1)
            assert wait_until(lambda: setter.stats.failures == 1 and not setter.stats.in_flight)
        assert "could not compute the weights" in caplog.text
        setter.maybe_set_weights(block=1)
        assert wait_until(lambda: setter.stats.successes == 1)
    finally:
        assert setter.stop(timeout=WAIT)


def test_no_uids_means_no_chain_call(make_setter):
    chain = FakeChain()
    setter = WeightSetter(chain, "wallet", lambda: ([], []), backoff=0.0).start()
    try:
        setter.maybe_set_weights(block=1)
        assert wait_until(lambda: not setter.stats.in_flight)
        assert chain.calls == []
    finally:
        assert setter.stop(timeout=WAIT)


def test_stop_is_bounded_during_a_hanging_call_and_backoff():
    hanging = FakeChain(script=["hang"])
    setter = WeightSetter(hanging, "wallet", lambda: WEIGHTS, timeout=WAIT * 10).start()
    setter.maybe_set_weights(block=1)
    assert hanging.entered.wait(WAIT)
    assert setter.stop(timeout=WAIT)
    assert setter.maybe_set_weights(block=1) is False
    hanging.release.set()

    failing = FakeChain(script=[(False, "no")] * 5)
    setter = WeightSetter(failing, "wallet", lambda: WEIGHTS, retries=4, backoff=WAIT * 10).start()
    setter.maybe_set_weights(block=1)
    assert failing.entered.wait(WAIT)
    assert setter.stop(timeout=WAIT)
    assert len(failing.calls) == 1


def test_request_before_start_and_bad_settings_raise():
    with pytest.raises(RuntimeError, match="start"):
        WeightSetter(FakeChain(), "wallet", lambda: WEIGHTS).maybe_set_weights(1)
    for bad in ({"epoch_length": 0}, {"timeout": 0}, {"retries": -1}, {"backoff": -1}):
        with pytest.raises(ValueError):
            WeightSetter(FakeChain(), "wallet", lambda: WEIGHTS, **bad)


def test_flags_reach_the_weight_setter():
    parser = new_parser("test")
    add_weight_args(parser)
    argv = ["--neuron.epoch_length", "7", "--neuron.weights_timeout", "3.5", "--neuron.weights_retries", "1",
            "--neuron.weights_backoff", "0.25"]
    setter = WeightSetter.from_config(build_config(parser, argv), FakeChain(), "wallet", lambda: WEIGHTS, 42)
    assert (setter.epoch_length, setter.timeout, setter.retries, setter.backoff) == (7, 3.5, 1, 0.25)
    assert setter.last_success_block == 42
    assert setter.version_key == bitmind.spec_version
    defaults = WeightSetter.from_config(build_config(parser, []), FakeChain(), "wallet", lambda: WEIGHTS)
    assert (defaults.epoch_length, defaults.retries) == (100, 3)


def test_end_to_end_with_local_chain(tmp_path):
    """Scorer -> WeightSetter -> LocalChain: the chain stores the scorer's weights; its rate limit is a failure."""
    from types import SimpleNamespace

    from bitmind.chain.local import LocalChain
    from validator.scoring import Scorer

    now = [1_000_000.0]
    with LocalChain(tmp_path / "chain.sqlite", seconds_per_block=1.0, weights_rate_limit=10,
                    clock=lambda: now[0]) as chain:
        chain.register_hotkey("validator", "vcold", stake=100.0)
        for index in range(3):
            chain.register_hotkey(f"miner-{index}", "mcold")
        wallet = SimpleNamespace(hotkey=SimpleNamespace(ss58_address="validator"),
                                 coldkeypub=SimpleNamespace(ss58_address="vcold"))
        scorer = Scorer(alpha=1.0)
        scorer.sync(chain.sync())
        scorer.score_challenge(1, [1, 2, 3], [0.9, 0.9, 0.1])
        scorer.score_challenge(0, [1, 2, 3], [0.1, 0.9, 0.1])
        # rewards: uid1 perfect -> 1; uid2 labels 1 0 preds 1 1 -> MCC 0, acc 1/2 -> 0.25; uid3 MCC 0, acc 1/2 -> 0.25
        setter = WeightSetter(chain, wallet, scorer.weights, epoch_length=5, backoff=0.0).start()
        try:
            now[0] += 20
            setter.maybe_set_weights()
            assert wait_until(lambda: setter.stats.successes == 1 and not setter.stats.in_flight)
            assert setter.last_success_block == chain.last_weights_block("validator") == 20
            stored = chain.get_weights("validator")
            assert stored == pytest.approx({0: 0.0, 1: 1 / 1.5, 2: 0.25 / 1.5, 3: 0.25 / 1.5})
            # due for us after 5 blocks, but the chain's rate limit is 10: a logged failure, the block is kept
            now[0] += 6
            setter.maybe_set_weights()
            assert wait_until(lambda: setter.stats.failures == 1 and not setter.stats.in_flight)
            assert "rate limited" in setter.stats.last_message
            assert setter.last_success_block == 20
        finally:
            assert setter.stop(timeout=WAIT)
