"""The validator process: flags, the loop, persistence, hotkey replacement, weights and the watchdog, on a LocalChain
with real trivial miners on 127.0.0.1."""

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import bitmind
from bitmind.chain.local import LocalChain
from bitmind.config import build_config
from bitmind.monitoring.watchdog import WATCHDOG_EXIT_CODE
from bitmind.transport import ValidatorClient
from neurons import validator as validator_module
from neurons.validator import Validator, build_parser, main
from tests._fixtures_validator import (
    HIGH_STAKE,
    VALIDATOR_STAKE,
    BrightSource,
    EmptySource,
    build_subnet,
    fill_synthetic_cache,
    fleet,  # noqa: F401 (a fixture)
    validator_argv,
)
from tests._wallets import free_port, make_wallet
from validator.augment import Augmenter
from validator.challenges import ChallengeSampler, RealImageSource, SyntheticImageSource
from validator.state import STATE_FILENAME

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
MINERS = ("honest", "constant", "hostile")


@pytest.fixture
def subnet(tmp_path, fleet):  # noqa: F811 (a fixture)
    built = build_subnet(tmp_path, fleet)
    yield built
    built.close()


def make_validator(subnet, root: Path, *extra: str, sampler=None, chain=None, on_watchdog_expire=None) -> Validator:
    config = build_config(build_parser(), validator_argv(subnet, root, *extra))
    return Validator(config, chain=chain, sampler=sampler, on_watchdog_expire=on_watchdog_expire)


def bright_sampler(root: Path, fake_probability: float = 0.5, fail_times: int = 0) -> ChallengeSampler:
    cache = fill_synthetic_cache(root / "synthetic_cache")
    return ChallengeSampler(BrightSource(fail_times), SyntheticImageSource(cache), Augmenter(), fake_probability)


@pytest.fixture
def validator(subnet, tmp_path):
    made = make_validator(subnet, tmp_path, sampler=bright_sampler(tmp_path))
    yield made
    made.close()


# --- every flag reaches the code ------------------------------------------------------------------------------
class Spy:
    """Records the keyword and positional arguments a constructor was called with."""

    def __init__(self, cls):
        self.cls = cls
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.cls(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch):
    real = Spy(RealImageSource)
    client = Spy(ValidatorClient)
    monkeypatch.setattr("validator.forward.RealImageSource", real)
    monkeypatch.setattr(validator_module, "ValidatorClient", client)
    return {"real": real, "client": client}


FLAG_CASES = [
    ("--neuron.sample_size", "7", lambda v, s, p: v.runner.params.sample_size == 7),
    ("--neuron.timeout", "2.5", lambda v, s, p: v.runner.params.timeout == 2.5),
    ("--neuron.vpermit_stake_limit", "123", lambda v, s, p: v.runner.params.vpermit_stake_limit == 123.0),
    ("--validator.jpeg_quality", "55", lambda v, s, p: v.runner.params.jpeg_quality == 55),
    ("--validator.fake_prob", "0.25", lambda v, s, p: v.sampler.fake_probability == 0.25),
    ("--validator.augment_probs", "2:1", lambda v, s, p: v.sampler.augmenter.levels == (2,)),
    ("--validator.real_datasets", "packaged,org/data?split=test",
     lambda v, s, p: [spec.id for spec in v.real_source.specs] == ["assets/real_sample", "org/data:test"]),
    ("--validator.real_cache", "{tmp}/rc", lambda v, s, p: v.real_source.cache_dir == p / "rc"),
    ("--validator.real_cache_max_gb", "0.5", lambda v, s, p: s["real"].calls[0][1]["max_bytes"] == 500_000_000),
    ("--validator.synthetic_cache", "{tmp}/sc", lambda v, s, p: v.sampler.synthetic.cache.root == p / "sc"),
    ("--validator.synthetic_cache", "", lambda v, s, p: v.sampler.synthetic is None),
    ("--validator.seed", "5", lambda v, s, p: (
        v.runner.rng.bit_generator.state == np.random.default_rng(5).bit_generator.state
        and s["real"].calls[0][1]["seed"] == 5)),
    ("--validator.external_ip", "10.1.2.3", lambda v, s, p: s["client"].calls[0][1]["external_ip"] == "10.1.2.3"),
    ("--neuron.alpha", "0.2", lambda v, s, p: v.scorer.params.alpha == 0.2),
    ("--neuron.history_mcc", "40", lambda v, s, p: v.scorer.params.history_mcc == 40),
    ("--neuron.history_acc", "4", lambda v, s, p: v.scorer.params.history_acc == 4),
    ("--neuron.epoch_length", "17", lambda v, s, p: v.weight_setter.epoch_length == 17),
    ("--neuron.weights_backoff", "0.5", lambda v, s, p: v.weight_setter.backoff == 0.5),
    ("--neuron.watchdog_timeout", "50", lambda v, s, p: v.monitor.watchdog.timeout_s == 50.0),
    ("--neuron.heartbeat_file", "{tmp}/hb.json", lambda v, s, p: v.monitor.heartbeat.path == p / "hb.json"),
    ("--neuron.state_dir", "{tmp}/st", lambda v, s, p: v.store.path == p / "st" / STATE_FILENAME),
]


@pytest.mark.parametrize(("flag", "value", "check"), FLAG_CASES, ids=[f"{c[0]}={c[1]}" for c in FLAG_CASES])
def test_flag_reaches_the_code(subnet, tmp_path, spies, flag, value, check):
    made = make_validator(subnet, tmp_path, flag, value.format(tmp=tmp_path))
    try:
        assert check(made, spies, tmp_path)
    finally:
        made.close()


@pytest.mark.parametrize("wanted", [0, 20])
def test_prefill_fills_the_real_cache_before_the_first_step(subnet, tmp_path, wanted):
    made = make_validator(subnet, tmp_path, "--validator.real_datasets", "packaged",
                          "--validator.prefill_images", str(wanted))
    try:
        made._prefill(made.config.validator.prefill_images)
        assert len(made.real_source) == 0 if wanted == 0 else len(made.real_source) >= wanted
    finally:
        made.close()


def test_metrics_port_flag_serves_metrics(subnet, tmp_path):
    port = free_port()
    made = make_validator(subnet, tmp_path, "--neuron.metrics_port", str(port))
    try:
        assert made.monitor.server is not None and made.monitor.server.port == port
    finally:
        made.close()


class RecordingEvent(threading.Event):
    """A stop event that records how long the loop asked to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return super().wait(0)


def test_step_interval_and_max_steps_drive_the_loop(subnet, tmp_path):
    made = make_validator(subnet, tmp_path, "--neuron.step_interval", "100", "--neuron.max_steps", "3",
                          sampler=bright_sampler(tmp_path))
    made.stop_event = RecordingEvent()
    made.run()
    assert made.steps_done == 3
    assert len(made.stop_event.waits) == 2  # no wait after the last step
    assert all(50 < wait <= 100 for wait in made.stop_event.waits)  # the default interval (30 s) would fail


def test_sync_interval_decides_when_new_neurons_are_seen(subnet, tmp_path):
    slow = make_validator(subnet, tmp_path / "slow", "--neuron.sync_interval", "1000", sampler=bright_sampler(tmp_path))
    fast = make_validator(subnet, tmp_path / "fast", sampler=bright_sampler(tmp_path))
    try:
        before = slow.view.n
        newcomer = make_wallet(subnet.wallet_root, "newcomer")
        subnet.chain.register_hotkey(newcomer.hotkey.ss58_address, newcomer.coldkeypub.ss58_address)
        slow.step()
        fast.step()
        assert slow.view.n == before and fast.view.n == before + 1
    finally:
        slow.close()
        fast.close()


@pytest.mark.parametrize(
    "bad",
    [
        ["--neuron.sample_size", "0"], ["--neuron.timeout", "0"], ["--neuron.timeout", "nan"],
        ["--validator.fake_prob", "1.5"], ["--validator.jpeg_quality", "0"], ["--validator.augment_probs", "9:1"],
        ["--validator.real_datasets", " , "], ["--neuron.step_interval", "-1"], ["--neuron.max_steps", "-1"],
        ["--neuron.vpermit_stake_limit", "-5"], ["--validator.real_cache_max_gb", "0"],
        ["--neuron.alpha", "0"], ["--neuron.alpha", "nan"], ["--neuron.history_mcc", "0"],
        ["--neuron.history_acc", "-3"], ["--neuron.epoch_length", "0"], ["--neuron.weights_backoff", "-1"],
    ],
)
def test_bad_flags_are_refused_before_anything_starts(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(bad)
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_unregistered_validator_refuses_to_start(subnet, tmp_path):
    make_wallet(subnet.wallet_root, "stranger")
    argv = validator_argv(subnet, tmp_path) + ["--wallet.name", "stranger"]
    with pytest.raises(SystemExit, match="not registered") as refused:
        Validator(build_config(build_parser(), argv))
    assert "--wallet.name stranger --wallet.hotkey" in str(refused.value)


# --- behaviour of the process ---------------------------------------------------------------------------------
def test_step_scores_persists_and_ranks_the_honest_miner_first(validator, subnet):
    for _ in range(6):
        result = validator.step()
        assert sorted(result.uids) == sorted(subnet.uids[name] for name in MINERS)
    scores = validator.scorer.scores
    honest, constant, hostile = (subnet.uids[name] for name in MINERS)
    assert scores[honest] > scores[constant] > scores[hostile] == 0.0
    saved = json.loads(validator.store.path.read_text())
    assert saved["scorer"]["step"] == 6 and saved["scorer"]["scores"][honest] == pytest.approx(scores[honest])
    heartbeat = json.loads((Path(validator.config.neuron.state_dir) / "heartbeat.json").read_text())
    assert heartbeat["step"] == 6 and heartbeat["queried"] == 3
    kinds = heartbeat["kinds"]  # per challenge kind: honest and constant (0.3) are right on real, honest on fakes
    assert sum(row["challenges"] for row in kinds.values()) == 6 and heartbeat["challenge_kind"] in kinds
    assert kinds["real"]["accuracy"] in (None, 1.0) and kinds["synthetic"]["accuracy"] in (None, 0.5)


def test_restart_keeps_scores_and_histories(subnet, tmp_path):
    first = make_validator(subnet, tmp_path, sampler=bright_sampler(tmp_path))
    for _ in range(3):
        first.step()
    scores, step = first.scorer.scores, first.scorer.step
    honest = subnet.uids["honest"]
    history = first.scorer.history(honest)
    first.close()
    second = make_validator(subnet, tmp_path, sampler=bright_sampler(tmp_path))
    try:
        assert second.scorer.step == step == 3
        np.testing.assert_allclose(second.scorer.scores, scores)
        assert second.scorer.history(honest) == history and len(history) == 3
        second.step()
        assert second.scorer.step == 4
    finally:
        second.close()


def test_new_hotkey_at_a_uid_starts_from_zero(validator, subnet):
    honest = subnet.uids["honest"]
    for _ in range(3):
        validator.step()
    assert validator.scorer.scores[honest] > 0
    newcomer = make_wallet(subnet.wallet_root, "newcomer")
    subnet.chain.register_hotkey(newcomer.hotkey.ss58_address, newcomer.coldkeypub.ss58_address, uid=honest)
    result = validator.step()
    assert honest not in result.uids  # the newcomer serves no axon yet
    stats = validator.scorer.stats(honest)
    assert stats.hotkey == newcomer.hotkey.ss58_address
    assert (stats.score, stats.history_len, stats.queried) == (0.0, 0, 0)
    assert validator.scorer.scores[subnet.uids["constant"]] > 0  # the others keep theirs


def _wait_for(condition, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_weights_are_set_on_chain_with_the_spec_version(validator, subnet):
    for _ in range(4):
        validator.step()
    validator.weight_setter.start()
    validator._maybe_set_weights()
    hotkey = subnet.validator.hotkey.ss58_address
    assert _wait_for(lambda: subnet.chain.get_weights(hotkey))
    weights = subnet.chain.get_weights(hotkey)
    assert sum(weights.values()) == pytest.approx(1.0)
    assert max(weights, key=weights.get) == subnet.uids["honest"]
    assert weights.get(subnet.uids["hostile"], 0.0) == 0.0
    with sqlite3.connect(subnet.chain_path) as conn:
        [(version_key,)] = conn.execute("SELECT version_key FROM weight_updates").fetchall()
    assert version_key == bitmind.spec_version


def test_weights_go_only_to_miners_a_step_may_query(validator, subnet, fleet):
    """A miner that can no longer be queried (here it takes a validator permit with stake above the limit; a miner
    that stops serving its axon is the same) would keep its frozen score forever: it gets no weight from then on."""
    for _ in range(4):
        validator.step()
    honest = subnet.uids["honest"]
    assert validator.scorer.scores[honest] > 0 and dict(zip(*validator._weights()))[honest] > 0
    subnet.chain.add_stake(fleet.servers["honest"].axon.wallet.hotkey.ss58_address, HIGH_STAKE)
    validator._next_sync = 0.0
    validator._maybe_sync()
    assert honest not in validator.step().uids
    weights = dict(zip(*validator._weights()))
    assert weights[honest] == 0.0 and validator.scorer.scores[honest] > 0  # the score is kept, not paid
    assert sum(weights.values()) == pytest.approx(1.0) and weights[subnet.uids["constant"]] > 0


class CountingChain(LocalChain):
    """A LocalChain that counts set_weights calls (each would be one extrinsic on subtensor)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_weights_calls = 0

    def set_weights(self, *args, **kwargs):
        self.set_weights_calls += 1
        return super().set_weights(*args, **kwargs)


def _step_and_ask_for_weights(made: Validator) -> None:
    made.step()
    made._maybe_set_weights()
    assert _wait_for(lambda: not made.weight_setter.stats.in_flight)


def test_a_validator_without_a_permit_logs_one_line_and_sends_no_weights(subnet, tmp_path, caplog):
    hotkey = subnet.validator.hotkey.ss58_address
    subnet.chain.add_stake(hotkey, -VALIDATOR_STAKE)  # no stake, no validator permit
    chain = CountingChain(subnet.chain_path)
    made = make_validator(subnet, tmp_path, "--neuron.epoch_length", "1", sampler=bright_sampler(tmp_path),
                          chain=chain)
    try:
        made.weight_setter.start()
        with caplog.at_level(logging.INFO):
            for _ in range(5):  # weights are due at every step
                _step_and_ask_for_weights(made)
        assert chain.set_weights_calls == 0
        assert made.steps_done == 5  # challenges went on
        lines = [record.getMessage() for record in caplog.records if "no validator permit" in record.getMessage()]
        assert len(lines) == 1, lines
        assert f"uid {subnet.uids['validator']} has no validator permit on netuid 34 (stake 0 alpha" in lines[0]
        # stake arrives: the next metagraph sync (every step here) sees the permit, and weights go out
        subnet.chain.add_stake(hotkey, VALIDATOR_STAKE)
        _step_and_ask_for_weights(made)
        assert chain.set_weights_calls == 1 and subnet.chain.get_weights(hotkey)
        assert made.weight_setter.stats.held == "" and made.weight_setter.stats.failures == 0
    finally:
        made.close()


def test_a_subnet_weights_version_above_ours_stops_the_validator_at_start(subnet, tmp_path):
    ours, required = bitmind.spec_version, bitmind.spec_version + 5
    strict_path = tmp_path / "strict-chain.sqlite"
    with LocalChain(strict_path, min_version_key=required) as strict:
        wallet = subnet.validator
        strict.register_hotkey(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address, stake=VALIDATOR_STAKE)
    argv = validator_argv(subnet, tmp_path, "--neuron.max_steps", "1")
    argv[argv.index("--chain.path") + 1] = str(strict_path)
    done = _run_process(argv, timeout=90)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "version_key" in line]
    assert len(lines) == 1 and f">= {required}" in lines[0] and f"sends {ours}" in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "state" / STATE_FILENAME).exists()  # it stopped before its first step


def test_a_subnet_weights_version_equal_to_ours_starts(subnet, tmp_path):
    equal_path = tmp_path / "equal-chain.sqlite"
    with LocalChain(equal_path, min_version_key=bitmind.spec_version) as equal:
        wallet = subnet.validator
        equal.register_hotkey(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address, stake=VALIDATOR_STAKE)
    made = make_validator(subnet, tmp_path, sampler=bright_sampler(tmp_path), chain=LocalChain(equal_path))
    try:
        assert made.weight_setter.version_key == bitmind.spec_version  # the key checked is the key sent
    finally:
        made.close()


class StuckChain(LocalChain):
    """A chain whose set_weights hangs until released and whose syncs fail after the first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.syncs = 0

    def sync(self):
        self.syncs += 1
        if self.syncs > 1:
            raise ConnectionError("chain endpoint unreachable")
        return super().sync()

    def set_weights(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(60)
        return False, "released"


def test_a_stuck_chain_never_stalls_challenges(subnet, tmp_path, caplog):
    chain = StuckChain(subnet.chain_path)
    made = make_validator(subnet, tmp_path, "--neuron.max_steps", "3", sampler=bright_sampler(tmp_path), chain=chain)
    try:
        with caplog.at_level(logging.WARNING):
            made.run()
        # set_weights was called after step 1 and hung; steps 2 and 3 ran meanwhile
        assert made.steps_done == 3 and chain.entered.is_set()
        assert made.weight_setter.stats.attempts == 1 and made.weight_setter.stats.successes == 0
        assert "metagraph sync failed (ConnectionError" in caplog.text
    finally:
        chain.release.set()


def test_an_exception_inside_a_step_is_logged_and_the_next_step_runs(subnet, tmp_path, caplog):
    made = make_validator(subnet, tmp_path, "--neuron.max_steps", "2",
                          sampler=bright_sampler(tmp_path, fake_probability=0.0, fail_times=1))
    with caplog.at_level(logging.INFO, logger="bitmind.validator"):
        made.run()
    assert made.steps_done == 2
    failures = [record for record in caplog.records if "failed at block" in record.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "step 1 failed" in failures[0].getMessage() and "OSError" in caplog.text
    assert sum(record.getMessage().startswith("step ") and "queried 3" in record.getMessage()
               for record in caplog.records) == 2


def test_empty_synthetic_cache_issues_real_challenges_with_a_warning(subnet, tmp_path, caplog):
    sampler = ChallengeSampler(BrightSource(), SyntheticImageSource(tmp_path / "empty"), Augmenter(), 1.0)
    made = make_validator(subnet, tmp_path, "--validator.fake_prob", "1", sampler=sampler)
    heartbeat_path = Path(made.config.neuron.state_dir) / "heartbeat.json"
    try:
        with caplog.at_level(logging.WARNING):
            results = [made.step() for _ in range(2)]
        assert [result.kind for result in results] == ["real", "real"]
        assert "no synthetic image cached yet" in caplog.text
        # the heartbeat tells a health probe the cache is empty (0, not "no cache")
        assert json.loads(heartbeat_path.read_text())["synthetic_cached"] == 0
        fill_synthetic_cache(tmp_path / "empty", count=2)
        assert made.step().kind == "fake"
        assert json.loads(heartbeat_path.read_text())["synthetic_cached"] == 2
    finally:
        made.close()


def test_heartbeat_says_when_there_is_no_synthetic_cache(subnet, tmp_path):
    made = make_validator(subnet, tmp_path, sampler=ChallengeSampler(BrightSource(), None, Augmenter()))
    try:
        assert made.step() is not None
        heartbeat = json.loads((Path(made.config.neuron.state_dir) / "heartbeat.json").read_text())
        assert "synthetic_cached" in heartbeat and heartbeat["synthetic_cached"] is None
    finally:
        made.close()


def test_no_real_image_is_no_step_and_does_not_feed_the_watchdog(subnet, tmp_path):
    fired = threading.Event()
    made = make_validator(subnet, tmp_path, "--neuron.watchdog_timeout", "0.5",
                          sampler=ChallengeSampler(EmptySource(), None), on_watchdog_expire=lambda idle: fired.set())
    runner = threading.Thread(target=made.run, daemon=True)
    runner.start()
    try:
        assert fired.wait(20), "the watchdog did not fire"
        assert made.steps_done == 0
    finally:
        made.stop()
        runner.join(20)
    assert not runner.is_alive()


def test_a_prefill_longer_than_the_watchdog_timeout_does_not_trip_it(subnet, tmp_path):
    # 32 images arrive in 4 rounds of 8, each taking 4 s of the watchdog's clock: the prefill (16 s) outlasts the 5 s
    # watchdog, a round does not. The watchdog reads a clock only the rounds advance, so how slowly a loaded machine
    # opens the dataset or runs the first step cannot decide the outcome; a round that did not kick it would.
    fired = threading.Event()
    made = make_validator(subnet, tmp_path, "--validator.prefill_images", "32", "--neuron.watchdog_timeout", "5",
                          "--neuron.max_steps", "1", on_watchdog_expire=lambda idle: fired.set())
    clock = [0.0]
    made.monitor.watchdog._clock = lambda: clock[0]  # the Watchdog's injectable time source, swapped after start
    made.monitor.watchdog.kick()
    heartbeat = Path(made.config.neuron.state_dir) / "heartbeat.json"
    seen_before_round = []
    real_round = made.real_source.fill_round

    def slow_round() -> int:
        if heartbeat.exists():
            seen_before_round.append(json.loads(heartbeat.read_text())["prefill_real_images"])
        clock[0] += 4.0
        time.sleep(0.3)  # the watchdog thread gets to look at the advanced clock
        return real_round()

    made.real_source.fill_round = slow_round
    made.run()  # prefill, one step, close
    assert not fired.is_set(), "the watchdog fired during the prefill"
    assert made.steps_done == 1 and clock[0] >= 16.0
    assert made.monitor.watchdog._last_kick == clock[0]  # kicked after the last round advanced the clock
    assert len(seen_before_round) >= 3 and seen_before_round == sorted(set(seen_before_round))
    final = json.loads(heartbeat.read_text())
    assert final["prefill_real_images"] >= 32 and final["step"] == 1


# --- the process as operators run it --------------------------------------------------------------------------
def _run_process(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "READ_ONLY": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "neurons.validator", *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_main_runs_two_steps_against_real_miners_and_exits_zero(subnet, tmp_path):
    # Every step wants a fake; the synthetic cache is empty, so each falls back to a real image with a warning.
    argv = validator_argv(subnet, tmp_path, "--neuron.max_steps", "2", "--validator.fake_prob", "1.0")
    done = _run_process(argv, timeout=90)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    step_lines = [line for line in done.stdout.splitlines() if "bitmind.validator: step " in line]
    assert len(step_lines) == 2 and all("queried 3" in line and "real_sample" in line for line in step_lines)
    assert "no synthetic image cached yet" in done.stdout
    saved = json.loads((tmp_path / "state" / STATE_FILENAME).read_text())
    assert saved["scorer"]["step"] == 2


def test_watchdog_exits_non_zero_when_no_step_succeeds(subnet, tmp_path):
    argv = validator_argv(subnet, tmp_path, "--neuron.watchdog_timeout", "2")
    argv[argv.index("--validator.real_datasets") + 1] = str(tmp_path / "no-such-dataset")
    done = _run_process(argv, timeout=90)
    assert done.returncode == WATCHDOG_EXIT_CODE, done.stdout[-3000:] + done.stderr[-3000:]
    assert "watchdog: no progress" in done.stdout + done.stderr
