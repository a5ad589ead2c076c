"""validator.forward and validator.miner_selection: one challenge step against real trivial miners on 127.0.0.1."""

import logging
import math

import bittensor as bt
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, matthews_corrcoef

from bitmind.chain.base import MetagraphView
from bitmind.transport import ValidatorClient
from tests._fixtures_validator import (
    FAKE_MODEL,
    TEST_TIMEOUT,
    BrightSource,
    EmptySource,
    build_subnet,
    fill_synthetic_cache,
    fleet,  # noqa: F401 (a fixture)
)
from tests._wallets import LOOPBACK
from validator.augment import Augmenter
from validator.challenges import ChallengeSampler, SyntheticImageSource
from validator.forward import (
    ChallengeRunner,
    ForwardParams,
    TimedAugmenter,
    format_step,
    parse_dataset_list,
)
from validator.miner_selection import eligible_uids, select_miners
from validator.reward import AnswerKind, window_metrics
from validator.scoring import Scorer

pytestmark = pytest.mark.timeout(120)


# --- miner selection (no network) -----------------------------------------------------------------------------
def _axon(port: int, ip: str = LOOPBACK) -> bt.AxonInfo:
    return bt.AxonInfo(version=1, ip=ip, port=port, ip_type=4, hotkey="h", coldkey="c")


def _view() -> MetagraphView:
    # uid: 0 me, 1 miner, 2 whale validator, 3 not serving, 4 low-stake permit holder, 5 miner, 6 NaN-stake permit
    return MetagraphView(
        netuid=34,
        block=10,
        uids=list(range(7)),
        hotkeys=[f"hk{uid}" for uid in range(7)],
        coldkeys=[f"ck{uid}" for uid in range(7)],
        stake=[500.0, 0.0, 10_000.0, 0.0, 4096.0, 0.0, math.nan],
        validator_permit=[True, False, True, False, True, False, True],
        axons=[_axon(9000), _axon(9001), _axon(9002), _axon(0, "0.0.0.0"), _axon(9004), _axon(9005), _axon(9006)],
    )


def test_eligible_miners_exclude_self_validators_and_non_serving():
    assert eligible_uids(_view(), "hk0", 4096.0) == [1, 4, 5]
    # the stake limit is a flag: lowered, the low-stake permit holder becomes a validator too
    assert eligible_uids(_view(), "hk0", 1000.0) == [1, 5]


def test_select_miners_draws_k_distinct_eligible_uids():
    rng = np.random.default_rng(0)
    draws = [select_miners(_view(), 2, rng, "hk0") for _ in range(30)]
    assert all(len(draw) == 2 and len(set(draw)) == 2 and set(draw) <= {1, 4, 5} for draw in draws)
    assert {uid for draw in draws for uid in draw} == {1, 4, 5}  # every eligible miner gets its turn
    assert select_miners(_view(), 50, rng, "hk0") == [1, 4, 5]
    with pytest.raises(ValueError, match="sample_size"):
        select_miners(_view(), 0, rng, "hk0")


# --- flags parsing --------------------------------------------------------------------------------------------
def test_dataset_list_parsing():
    specs = parse_dataset_list("packaged, org/data?split=test , /tmp/x.parquet?labels=0,2&shuffle_buffer=5")
    assert [spec.split for spec in specs] == ["train", "test", "train"]
    assert specs[0].path.endswith("real_sample")
    assert specs[2].labels == (0, 2) and specs[2].shuffle_buffer == 5
    for bad in ("", " , ", "org/data?bogus=1"):
        with pytest.raises(ValueError):
            parse_dataset_list(bad)


# --- the reward's confusion counts against scikit-learn (the oracle) ------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn warns about single-class windows
def test_window_metrics_match_sklearn_on_random_windows():
    rng = np.random.default_rng(3)
    for _ in range(120):
        size = int(rng.integers(1, 120))
        labels = rng.integers(0, 2, size)
        probabilities = rng.choice([0.0, 0.3, 0.5, 0.50001, 0.8, 1.0], size)
        window = [None, 10, 100][int(rng.integers(3))]
        mcc, accuracy = window_metrics(list(zip(labels.tolist(), probabilities.tolist(), strict=True)), window)
        start = 0 if window is None else max(0, size - window)
        truth, predicted = labels[start:], (probabilities[start:] > 0.5).astype(int)
        with np.errstate(all="ignore"):
            assert mcc == pytest.approx(matthews_corrcoef(truth, predicted), abs=1e-12)
        assert accuracy == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)


# --- one step against real miners -----------------------------------------------------------------------------
@pytest.fixture
def world(tmp_path, fleet):  # noqa: F811 (a fixture)
    """A subnet, a synced scorer and a client signed by the validator's wallet."""
    subnet = build_subnet(tmp_path, fleet)
    scorer = Scorer(alpha=0.3)
    view = subnet.chain.sync()
    scorer.sync(view)
    client = ValidatorClient(subnet.validator, external_ip=LOOPBACK)
    yield subnet, scorer, view, client
    client.close()
    subnet.close()


def _runner(world, sampler, sample_size=50, seed=1) -> ChallengeRunner:
    subnet, scorer, _, client = world
    params = ForwardParams(sample_size=sample_size, timeout=TEST_TIMEOUT)
    return ChallengeRunner(
        sampler, scorer, client.query_sync, subnet.validator.hotkey.ss58_address, params, np.random.default_rng(seed)
    )


def test_step_queries_only_eligible_miners_and_ranks_the_honest_one_first(world, tmp_path):
    subnet, scorer, view, _ = world
    synthetic = SyntheticImageSource(fill_synthetic_cache(tmp_path / "synthetic"))
    runner = _runner(world, ChallengeSampler(BrightSource(), synthetic, TimedAugmenter(), fake_probability=0.5))
    miners = {name: subnet.uids[name] for name in ("honest", "constant", "hostile")}
    labels, hostile_rewards = [], []
    for _ in range(8):
        result = runner.run(view)
        assert result is not None and result.challenge is not None
        assert result.uids == sorted(miners.values())  # not itself, not the whale, not the silent neuron
        labels.append(result.challenge.label)
        by_uid = dict(zip(result.uids, zip(result.responses, result.rewards, strict=True), strict=True))
        honest_response, honest_reward = by_uid[miners["honest"]]
        assert honest_response.status == 200 and honest_reward.kind is AnswerKind.VALID
        assert honest_response.prediction == result.challenge.label
        hostile_response, hostile_reward = by_uid[miners["hostile"]]
        hostile_rewards.append((hostile_response.status, hostile_reward))
        assert 0 < result.mean_latency < TEST_TIMEOUT
    assert set(labels) == {0, 1}
    assert all(reward.value == 0.0 and reward.kind is not AnswerKind.VALID for _, reward in hostile_rewards)
    statuses = {status for status, _ in hostile_rewards}
    assert {500, 408} <= statuses  # the exception and the late answer; NaN and 1.2 answer but are invalid
    scores = scorer.scores
    assert scores[miners["honest"]] > scores[miners["constant"]] > 0
    assert scores[miners["hostile"]] == 0.0
    assert scorer.stats(miners["hostile"]).history_len == 0


def test_sample_size_limits_the_miners_queried(world):
    subnet, _, view, _ = world
    runner = _runner(world, ChallengeSampler(BrightSource(), None, Augmenter()), sample_size=2)
    seen = set()
    for _ in range(4):
        result = runner.run(view)
        assert len(result.uids) == 2 == len(result.responses)
        seen.update(result.uids)
    assert seen <= {subnet.uids[name] for name in ("honest", "constant", "hostile")}


def test_empty_synthetic_cache_gives_real_challenges_with_a_warning(world, tmp_path, caplog):
    _, _, view, _ = world
    empty = SyntheticImageSource(tmp_path / "empty_cache")
    runner = _runner(world, ChallengeSampler(BrightSource(), empty, Augmenter(), fake_probability=1.0))
    with caplog.at_level(logging.WARNING):
        results = [runner.run(view) for _ in range(2)]
    assert [result.challenge.label for result in results] == [0, 0]
    assert [result.kind for result in results] == ["real", "real"]
    assert sum("no synthetic image cached" in record.getMessage() for record in caplog.records) == 2


class ManualClock:
    """A monotonic clock the test moves by hand: the alarm interval passes without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _alarms(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]


def test_a_synthetic_cache_empty_for_long_raises_one_error_per_interval(tmp_path, caplog):
    root = tmp_path / "synthetic"
    clock = ManualClock()
    sampler = ChallengeSampler(BrightSource(), SyntheticImageSource(root), Augmenter(), fake_probability=1.0,
                               empty_alarm_s=600.0, clock=clock)
    rng = np.random.default_rng(0)

    def draw_at(*times: float) -> list[int]:
        labels = []
        for now in times:
            clock.now = now
            labels.append(sampler.sample(rng).label)
        return labels

    with caplog.at_level(logging.WARNING):
        assert draw_at(0, 300, 599) == [0, 0, 0]  # fakes sent as real ones; no alarm yet: the generator may be starting
        assert _alarms(caplog) == []
        draw_at(600)
        (alarm,) = _alarms(caplog)
        assert f"synthetic cache {root} empty for 600 s: 4 fake challenges were sent as real ones" in alarm
        assert "is bitmind_generator running?" in alarm and "pm2 logs bitmind_generator" in alarm
        assert "python -m bitmind.monitoring check ~/.bitmind/generator/heartbeat.json" in alarm
        draw_at(601, 900, 1199)
        assert len(_alarms(caplog)) == 1  # at most one per interval
        draw_at(1200)
        assert len(_alarms(caplog)) == 2 and "empty for 1200 s: 8 fake challenges" in _alarms(caplog)[-1]

        # a synthetic image drawn resets the count: a later outage is timed from its own start
        fill_synthetic_cache(root, count=1)
        assert draw_at(1300) == [1]
        for path in root.iterdir():
            path.unlink()
        draw_at(1400, 1999)
        assert len(_alarms(caplog)) == 2
        draw_at(2000)
        assert len(_alarms(caplog)) == 3 and "empty for 600 s: 3 fake challenges" in _alarms(caplog)[-1]


@pytest.mark.parametrize("interval", [0.0, -1.0, math.nan])
def test_the_empty_cache_alarm_interval_must_be_positive(tmp_path, interval):
    with pytest.raises(ValueError, match="empty_alarm_s must be > 0"):
        ChallengeSampler(BrightSource(), SyntheticImageSource(tmp_path), empty_alarm_s=interval)


def test_fake_challenge_carries_the_generator_metadata(world, tmp_path):
    _, _, view, _ = world
    synthetic = SyntheticImageSource(fill_synthetic_cache(tmp_path / "synthetic", count=1))
    runner = _runner(world, ChallengeSampler(BrightSource(), synthetic, Augmenter(), fake_probability=1.0))
    result = runner.run(view)
    assert (result.kind, result.source, result.model) == ("fake", "synthetic", FAKE_MODEL)
    assert result.challenge.image.size == (256, 256)
    line = format_step(3, result, [(1, 0.5)])
    for part in ("step 3", "fake", "source=synthetic", f"model={FAKE_MODEL}", "queried 3", "top 1:0.500", "querying="):
        assert part in line


def test_no_real_image_yet_means_no_challenge_and_no_query(world):
    _, scorer, view, _ = world

    def never(*_):
        raise AssertionError("nothing may be sent without a challenge")

    subnet = world[0]
    runner = ChallengeRunner(ChallengeSampler(EmptySource(), None), scorer, never, subnet.validator.hotkey.ss58_address)
    assert runner.run(view) is None
    assert scorer.step == 0


def test_no_eligible_miner_means_an_empty_step(world):
    subnet, scorer, view, _ = world

    def never(*_):
        raise AssertionError("nothing may be sent without a miner")

    params = ForwardParams(vpermit_stake_limit=0.0, sample_size=5)
    hotkey = subnet.validator.hotkey.ss58_address
    runner = ChallengeRunner(ChallengeSampler(BrightSource(), None), scorer, never, hotkey, params)
    only_validators = MetagraphView(34, 1, [0], ["x"], ["y"], [1.0], [True], [view.axons[1]])
    result = runner.run(only_validators)
    assert result.challenge is None and result.uids == [] and result.kind == "none"
    assert "no eligible miner" in format_step(1, result, [])


def test_phase_timings_split_sampling_from_augmentation(world):
    _, _, view, _ = world
    runner = _runner(world, ChallengeSampler(BrightSource(), None, TimedAugmenter({3: 1.0})))
    result = runner.run(view)
    timings = result.timings
    assert timings.augmentation > 0 and timings.sampling > 0 and timings.encoding > 0 and timings.scoring > 0
    assert timings.querying > 0 and timings.persistence == 0.0  # the neuron saves, not the runner
    assert timings.total == pytest.approx(sum(timings.as_dict().values()))
    assert result.challenge.metadata["augmentation"]["level"] == 3
