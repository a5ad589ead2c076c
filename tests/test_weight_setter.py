"""The weight setter never stalls its caller, sends at most one extrinsic per try, holds back (logging once) what the
chain would refuse, backs off after failures, and records what it achieved."""

import inspect
import logging
import threading
import time
from types import SimpleNamespace

import pytest

import bitmind
from bitmind.chain.base import Chain, MetagraphView, WeightsRules
from bitmind.chain.local import LocalChain
from bitmind.config import build_config, new_parser
from validator.weight_setter import MAX_BACKOFF, WeightSetter, add_weight_args

WAIT = 10.0  # upper bound for any wait in these tests; passing runs take milliseconds
HOTKEY = "validator-hotkey"
WALLET = SimpleNamespace(hotkey=SimpleNamespace(ss58_address=HOTKEY), coldkeypub=SimpleNamespace(ss58_address="c"))


def wait_until(predicate, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class FakeChain(Chain):
    """Scripted answers to set_weights: (ok, msg) tuples, exceptions to raise, or "hang" (until released).
    `rules` is what weights_rules answers (an exception is raised)."""

    netuid = 34

    def __init__(self, script=(), current_block=1000, rules=None):
        self.script = list(script)
        self.current_block = current_block
        self.rules = rules
        self.calls = []
        self.rule_reads = []
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

    def weights_rules(self, hotkey):
        self.rule_reads.append(hotkey)
        if isinstance(self.rules, BaseException):
            raise self.rules
        return self.rules or WeightsRules(self.current_block, 0, 0, None)

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


class Clock:
    """A monotonic clock moved by hand, for the backoff."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


WEIGHTS = ([0, 1, 2], [0.5, 0.3, 0.2])


@pytest.fixture()
def make_setter():
    made = []

    def make(chain, **kwargs):
        kwargs.setdefault("backoff", 0.0)
        setter = WeightSetter(chain, WALLET, lambda: WEIGHTS, **kwargs).start()
        made.append((setter, chain))
        return setter

    yield make
    for setter, chain in made:
        chain.release.set()
        assert setter.stop(timeout=WAIT)


def request(setter, block=None):
    """One request, waited for until the worker has finished with it."""
    assert setter.maybe_set_weights(block)
    assert wait_until(lambda: not setter.stats.in_flight)


def test_the_fake_chain_takes_exactly_the_chain_interfaces_arguments():
    for name in ("block", "sync", "register", "serve_axon", "weights_rules", "set_weights"):
        assert list(inspect.signature(getattr(FakeChain, name)).parameters) == list(
            inspect.signature(getattr(Chain, name)).parameters), name


def test_success_records_block_and_passes_spec_version(make_setter, caplog):
    chain = FakeChain()
    setter = make_setter(chain)
    with caplog.at_level(logging.INFO, logger="validator.weight_setter"):
        request(setter, block=1000)
    assert chain.calls == [(WALLET, [0, 1, 2], [0.5, 0.3, 0.2], bitmind.spec_version)]
    assert chain.rule_reads == [HOTKEY]
    assert setter.last_success_block == 1000
    assert setter.stats.last_ok is True and setter.stats.attempts == 1 and setter.stats.successes == 1
    line = [r.getMessage() for r in caplog.records if "weights: set" in r.getMessage()]
    assert len(line) == 1 and "3 uids" in line[0] and "0:0.5000" in line[0] and f"version_key {bitmind.spec_version}" \
        in line[0]


def test_not_due_until_epoch_length_blocks_passed(make_setter):
    chain = FakeChain()
    setter = make_setter(chain, epoch_length=100, last_success_block=1000)
    request(setter, block=1099)
    assert chain.calls == [] and chain.rule_reads == []
    request(setter, block=1100)
    assert setter.stats.successes == 1 and setter.last_success_block == 1100


def test_a_recorded_block_ahead_of_the_chain_is_forgotten_with_a_warning(make_setter, caplog):
    """A state dir reused on a chain made anew must not hold weights back until the old block comes round."""
    chain = FakeChain()
    setter = make_setter(chain, epoch_length=100, last_success_block=50_000)
    with caplog.at_level(logging.WARNING, logger="validator.weight_setter"):
        request(setter, block=1500)
    assert setter.stats.successes == 1 and setter.last_success_block == 1500
    assert "last set block on record (50000) is ahead of the chain (block 1500)" in caplog.text


def test_block_from_chain_when_caller_has_none(make_setter):
    chain = FakeChain(current_block=4321)
    setter = make_setter(chain)
    request(setter)
    assert setter.last_success_block == 4321


def test_the_chains_rate_limit_is_waited_for_strictly_without_an_extrinsic(make_setter, caplog):
    """blocks_since_update == weights_rate_limit would be refused by the chain: no call, no failure, no warning."""
    chain = FakeChain(rules=WeightsRules(block=1100, weights_version=0, rate_limit=100, blocks_since_update=100))
    setter = make_setter(chain, epoch_length=100, last_success_block=1000)
    with caplog.at_level(logging.WARNING, logger="validator.weight_setter"):
        request(setter, block=1100)
    assert chain.calls == [] and setter.stats.failures == 0 and caplog.records == []
    chain.rules = WeightsRules(block=1101, weights_version=0, rate_limit=100, blocks_since_update=101)
    request(setter, block=1101)
    assert len(chain.calls) == 1 and setter.last_success_block == 1101


def test_a_required_version_above_ours_holds_weights_with_one_error_line(make_setter, caplog):
    ours = bitmind.spec_version
    chain = FakeChain(rules=WeightsRules(block=1000, weights_version=ours + 1, rate_limit=0, blocks_since_update=None))
    setter = make_setter(chain)
    with caplog.at_level(logging.INFO, logger="validator.weight_setter"):
        for block in range(1000, 1005):
            request(setter, block=block)
    assert chain.calls == [] and setter.stats.failures == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f">= {ours + 1}" in errors[0] and f"sends {ours}" in errors[0]
    assert f"sends {ours}" in setter.stats.held


def test_a_hold_is_logged_once_sends_nothing_and_clears_when_lifted(make_setter, caplog):
    chain = FakeChain()
    reason = ["uid 0 has no validator permit"]
    setter = make_setter(chain, hold_fn=lambda: reason[0])
    with caplog.at_level(logging.INFO, logger="validator.weight_setter"):
        for block in range(1000, 1006):
            request(setter, block=block)
        assert chain.calls == [] and chain.rule_reads == [] and setter.stats.held == reason[0]
        reason[0] = None
        request(setter, block=1006)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no validator permit" in m and "not sent" in m for m in messages) == 1
    assert sum("no longer held back" in m for m in messages) == 1
    assert len(chain.calls) == 1 and setter.stats.held == ""


def test_one_try_is_one_call_and_failures_back_off_doubling(make_setter, caplog):
    clock = Clock()
    chain = FakeChain(script=[(False, "rejected"), RuntimeError("connection reset"), (True, "included")])
    setter = make_setter(chain, backoff=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="validator.weight_setter"):
        request(setter, block=2000)
        assert len(chain.calls) == 1 and setter.stats.failures == 1  # no retry inside a try
        for now in (0.0, 9.9):  # backing off: requests send nothing
            clock.now = now
            request(setter, block=2001)
        assert len(chain.calls) == 1
        clock.now = 10.0
        request(setter, block=2002)
        assert len(chain.calls) == 2 and "RuntimeError: connection reset" in setter.stats.last_message
        clock.now = 29.9  # the second consecutive failure doubled the wait to 20 s
        request(setter, block=2003)
        assert len(chain.calls) == 2
        clock.now = 30.0
        request(setter, block=2004)
    assert len(chain.calls) == 3 and setter.stats.successes == 1 and setter.last_success_block == 2004
    assert setter.stats.attempts == 3 and setter.stats.failures == 2
    failed = [r.getMessage() for r in caplog.records if "FAILED" in r.getMessage()]
    assert len(failed) == 2 and "next try in 10 s" in failed[0] and "next try in 20 s" in failed[1]


def test_the_backoff_is_capped(make_setter):
    clock = Clock()
    chain = FakeChain(script=[(False, "no")] * 20)
    setter = make_setter(chain, backoff=MAX_BACKOFF / 2, clock=clock)
    for _ in range(4):
        request(setter, block=1)
        clock.now += MAX_BACKOFF
    assert len(chain.calls) == 4 and f"next try in {MAX_BACKOFF:g} s" in setter.stats.last_message


def test_a_hanging_chain_never_blocks_the_caller_nor_piles_up_calls(make_setter):
    chain = FakeChain(script=["hang"])
    setter = make_setter(chain)
    assert setter.maybe_set_weights(block=1000)
    assert chain.entered.wait(WAIT)
    assert setter.stats.in_flight
    for _ in range(3):  # the caller is free, and further requests are refused, not queued
        assert setter.maybe_set_weights(block=1000) is False
    chain.release.set()
    assert wait_until(lambda: setter.stats.successes == 1 and not setter.stats.in_flight)
    assert len(chain.calls) == 1


def test_unreadable_rules_or_block_send_nothing(make_setter, caplog):
    chain = FakeChain(rules=ConnectionError("websocket closed"))
    setter = make_setter(chain)
    with caplog.at_level(logging.WARNING, logger="validator.weight_setter"):
        request(setter, block=1)
    assert chain.calls == [] and "could not read the subnet's weights rules (ConnectionError" in caplog.text


def test_malformed_chain_answer_is_a_failure(make_setter):
    chain = FakeChain(script=[None])
    setter = make_setter(chain)
    request(setter, block=1)
    assert setter.stats.failures == 1 and "TypeError" in setter.stats.last_message


def test_broken_weights_fn_is_logged_and_survived(caplog):
    chain = FakeChain()
    calls = iter([RuntimeError("scorer broke"), WEIGHTS])

    def weights_fn():
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    setter = WeightSetter(chain, WALLET, weights_fn, backoff=0.0).start()
    try:
        with caplog.at_level(logging.ERROR, logger="validator.weight_setter"):
            request(setter, block=1)
        assert "could not compute the weights" in caplog.text and setter.stats.failures == 1
        request(setter, block=1)
        assert setter.stats.successes == 1
    finally:
        assert setter.stop(timeout=WAIT)


def test_no_uids_means_no_chain_call():
    chain = FakeChain()
    setter = WeightSetter(chain, WALLET, lambda: ([], []), backoff=0.0).start()
    try:
        request(setter, block=1)
        assert chain.calls == []
    finally:
        assert setter.stop(timeout=WAIT)


def test_stop_is_bounded_while_idle_and_refuses_later_requests():
    setter = WeightSetter(FakeChain(), WALLET, lambda: WEIGHTS).start()
    assert setter.stop(timeout=WAIT)
    assert setter.maybe_set_weights(block=1) is False


def test_request_before_start_and_bad_settings_raise():
    with pytest.raises(RuntimeError, match="start"):
        WeightSetter(FakeChain(), WALLET, lambda: WEIGHTS).maybe_set_weights(1)
    for bad in ({"epoch_length": 0}, {"backoff": -1}, {"backoff": float("nan")}):
        with pytest.raises(ValueError):
            WeightSetter(FakeChain(), WALLET, lambda: WEIGHTS, **bad)


def test_flags_reach_the_weight_setter():
    parser = new_parser("test")
    add_weight_args(parser)
    argv = ["--neuron.epoch_length", "7", "--neuron.weights_backoff", "0.25"]
    setter = WeightSetter.from_config(build_config(parser, argv), FakeChain(), WALLET, lambda: WEIGHTS, 42)
    assert (setter.epoch_length, setter.backoff, setter.last_success_block) == (7, 0.25, 42)
    assert setter.version_key == bitmind.spec_version
    defaults = WeightSetter.from_config(build_config(parser, []), FakeChain(), WALLET, lambda: WEIGHTS)
    assert (defaults.epoch_length, defaults.backoff) == (100, 60.0)
    for gone in ("--neuron.weights_retries", "--neuron.weights_timeout"):  # one try = one extrinsic; one timeout
        with pytest.raises(SystemExit):
            build_config(parser, [gone, "1"])


class CountingLocalChain(LocalChain):
    """A LocalChain that records every set_weights answer (each would be one extrinsic on subtensor)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answers = []

    def set_weights(self, wallet, uids, weights, version_key):
        answer = super().set_weights(wallet, uids, weights, version_key)
        self.answers.append(answer)
        return answer


def test_end_to_end_with_local_chain_when_epoch_length_equals_the_rate_limit(tmp_path):
    """Scorer -> WeightSetter -> LocalChain with epoch_length == weights_rate_limit: the chain stores the scorer's
    weights, and no try of a later epoch is refused (the setter waits for the strict limit)."""
    from validator.scoring import Scorer

    now = [1_000_000.0]
    with CountingLocalChain(tmp_path / "chain.sqlite", seconds_per_block=1.0, weights_rate_limit=10,
                            clock=lambda: now[0]) as chain:
        chain.register_hotkey(HOTKEY, "c", stake=100.0)
        for index in range(3):
            chain.register_hotkey(f"miner-{index}", "mcold")
        scorer = Scorer(alpha=1.0)
        scorer.sync(chain.sync())
        scorer.score_challenge(1, [1, 2, 3], [0.9, 0.9, 0.1])
        scorer.score_challenge(0, [1, 2, 3], [0.1, 0.9, 0.1])
        # rewards: uid1 perfect -> 1; uid2 labels 1 0 preds 1 1 -> MCC 0, acc 1/2 -> 0.25; uid3 MCC 0, acc 1/2 -> 0.25
        setter = WeightSetter(chain, WALLET, scorer.weights, epoch_length=10, backoff=0.0).start()
        try:
            now[0] += 20
            request(setter)
            assert setter.last_success_block == chain.last_weights_block(HOTKEY) == 20
            assert chain.get_weights(HOTKEY) == pytest.approx({0: 0.0, 1: 1 / 1.5, 2: 0.25 / 1.5, 3: 0.25 / 1.5})
            for _ in range(3):  # three more epochs, each asked at its first due block and at every block after
                start = setter.last_success_block
                for block in range(start + 10, start + 13):
                    now[0] = 1_000_000.0 + block
                    request(setter)
                assert setter.last_success_block == start + 11  # the first block the chain accepts
            assert chain.answers and all(ok for ok, _ in chain.answers), chain.answers
            assert len(chain.answers) == 4 and setter.stats.failures == 0
        finally:
            assert setter.stop(timeout=WAIT)
