"""Validator process: challenge miners with real and AI-generated images, score them, set weights.

Wiring only: miner selection and the challenge step come from `validator.forward` (video clips, a
`--validator.video_share` of the steps, from `validator.video`), rewards and scores from
`validator.scoring`, persistence from `validator.state`, weight setting from `validator.weight_setter`, chain and
transport from `bitmind`.

Each step: sync the metagraph when `--neuron.sync_interval` has passed → query up to `--neuron.sample_size` miners
with one challenge → score → save the state atomically → ask the weight setter's thread to set weights if due →
one log line. Steps start every `--neuron.step_interval` seconds. No exception stops the loop: it is logged with
the step and block and the next step runs; the watchdog (`--neuron.watchdog_timeout`) exits the process when no
step succeeds for that long (before the first step: no real-image prefill round adds images), so pm2 restarts it.

Local demo (a LocalChain, the packaged real sample, the generator's cache):
    python -m neurons.validator --chain local --chain.path ~/.bitmind/localnet/chain.sqlite \
        --wallet.name validator --wallet.hotkey default --validator.real_datasets packaged \
        --validator.synthetic_cache ~/.bitmind/validator/synthetic_cache --validator.external_ip 127.0.0.1
"""

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import bittensor as bt
import numpy as np

import bitmind
from bitmind.chain import Chain, MetagraphView, make_chain
from bitmind.config import add_chain_args, add_neuron_args, build_config, new_parser, setup_logging
from bitmind.monitoring.monitor import Monitor, add_monitoring_args
from bitmind.transport import ValidatorClient
from validator.challenges import ChallengeSampler
from validator.forward import (
    CHALLENGE_SIZE,
    ChallengeRunner,
    ForwardParams,
    StepResult,
    add_forward_args,
    build_sampler,
    check_forward_config,
    format_step,
)
from validator.miner_selection import eligible_uids
from validator.reward import AnswerKind
from validator.scoring import Scorer, add_scoring_args
from validator.state import StateStore
from validator.video.config import VideoChallenges, add_video_args, build_video_challenges, check_video_config
from validator.weight_setter import WeightSetter, add_weight_args

log = logging.getLogger("bitmind.validator")

DEFAULT_STEP_INTERVAL = 30.0
# After a round without a challenge (no real image cached yet), try again after at most this long.
NO_CHALLENGE_RETRY_S = 1.0
MIN_WAIT_S = 0.05  # never spin: even a zero step interval waits this long after a failed step
TOP_SCORES_LOGGED = 5


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Subnet-34 validator: challenges miners with real and AI-generated images, sets weights.")
    add_chain_args(parser)
    add_neuron_args(parser, "validator")
    add_monitoring_args(parser)
    add_scoring_args(parser)
    add_weight_args(parser)
    add_forward_args(parser)
    add_video_args(parser)
    parser.add_argument(
        "--neuron.step_interval",
        type=float,
        default=DEFAULT_STEP_INTERVAL,
        help="Seconds between the starts of two steps (a step that takes longer is followed at once).",
    )
    parser.add_argument(
        "--neuron.max_steps",
        type=int,
        default=0,
        help="Stop after this many completed steps (0: run until stopped). For tests and demos.",
    )
    parser.add_argument(
        "--validator.external_ip",
        type=str,
        default="",
        help="IP this validator's requests announce (empty: looked up; 127.0.0.1 when offline).",
    )
    return parser


def check_config(config: bt.Config) -> list[str]:
    """Problems with the flags, one message each (empty when they are usable)."""
    problems = check_forward_config(config) + check_video_config(config) + Scorer.check_config(config)
    neuron = config.neuron
    weights_problem = WeightSetter.check_settings(neuron.epoch_length, neuron.weights_backoff)
    if weights_problem:
        problems.append(weights_problem)
    if not neuron.step_interval >= 0:
        problems.append(f"--neuron.step_interval must be >= 0, got {neuron.step_interval}")
    if neuron.max_steps < 0:
        problems.append(f"--neuron.max_steps must be >= 0, got {neuron.max_steps}")
    if not neuron.sync_interval >= 0:
        problems.append(f"--neuron.sync_interval must be >= 0, got {neuron.sync_interval}")
    return problems


def _outcome(status: int, kind: AnswerKind) -> str:
    """A small set of labels for the answers metric."""
    if status == 200:
        return kind.value
    return {408: "timeout", 503: "unreachable", 401: "refused", 403: "refused"}.get(status, "error")


class Validator:
    """Owns the chain view, scorer, state store, weight setter, sources and client; `run()` loops until `stop()`.

    `sampler` replaces the one the flags describe (tests); `on_watchdog_expire` replaces the watchdog's process exit.
    """

    def __init__(
        self,
        config: bt.Config,
        chain: Chain | None = None,
        sampler: ChallengeSampler | None = None,
        on_watchdog_expire: Callable[[float], None] | None = None,
        video: VideoChallenges | None = None,
    ) -> None:
        self.config = config
        self.wallet = bt.Wallet(config=config)
        self.hotkey = self.wallet.hotkey.ss58_address
        self.chain = chain or make_chain(config)
        self.stop_event = threading.Event()
        self.steps_done = 0

        self.store = StateStore.in_dir(config.neuron.state_dir, config.netuid)
        state = self.store.load()  # before anything could save: a restart keeps scores
        self.scorer = Scorer.from_config(config, state.scorer if state else None)
        self.view = self._apply(self.chain.sync())
        self.uid = self.view.require_uid(self.hotkey, config.wallet.name, config.wallet.hotkey)
        problem = self.chain.weights_rules(self.hotkey).version_problem(bitmind.spec_version)
        if problem:
            raise SystemExit(f"validator cannot start on netuid {config.netuid}: {problem}")
        self._next_sync = time.monotonic() + config.neuron.sync_interval

        self.real_source = None
        if sampler is None:
            sampler, self.real_source = build_sampler(config)
            video = build_video_challenges(config, CHALLENGE_SIZE)
        self.sampler = sampler
        self.video = video
        seed = config.validator.seed
        self.client = ValidatorClient(self.wallet, external_ip=config.validator.external_ip or None)
        self.runner = ChallengeRunner(
            sampler,
            self.scorer,
            self.client.query_sync,
            self.hotkey,
            ForwardParams.from_config(config),
            np.random.default_rng(None if seed < 0 else seed),
            video,
        )
        self.weight_setter = WeightSetter.from_config(
            config, self.chain, self.wallet, self._weights, state.last_weights_block if state else None,
            hold_fn=self._weights_hold,
        )
        self._weights_seen = (0, 0)  # (successes, failures) already reported to the metrics
        self.monitor = Monitor.from_config(config, role="validator", on_watchdog_expire=on_watchdog_expire)
        log.info(
            "validator uid=%d hotkey=%s netuid=%d neurons=%d sample_size=%d timeout=%gs step_interval=%gs "
            "challenge mix %s state=%s",
            self.uid, self.hotkey[:8], config.netuid, self.view.n, config.neuron.sample_size, config.neuron.timeout,
            config.neuron.step_interval, " ".join(f"{k}={p:.3g}" for k, p in self.sampler.kind_probs.items()),
            self.store.path,
        )

    # --- chain view ------------------------------------------------------------------------------------------
    def _weights(self) -> tuple[list[int], list[float]]:
        """The scorer's weights, paid only to the miners a step may query now (`eligible_uids` of the last view)."""
        limit = self.config.neuron.vpermit_stake_limit
        return self.scorer.weights(among=eligible_uids(self.view, self.hotkey, limit))

    def _apply(self, view: MetagraphView) -> MetagraphView:
        """Hand a fresh metagraph to the scorer; a new hotkey at a uid starts from zero."""
        for uid in self.scorer.sync(view):
            hotkey = view.hotkeys[view.index_of(uid)]
            log.info("uid %d has a new hotkey %s: its score and history start from zero", uid, hotkey[:8])
        return view

    def _weights_hold(self) -> str | None:
        """Why the chain would refuse our weights per the last metagraph sync (None when it would not). Read by the
        weight setter before each try, so a permit granted by a later sync is noticed."""
        view, uid = self.view, self.uid
        if uid is None:
            return f"hotkey {self.hotkey} is not registered on netuid {view.netuid}"
        index = view.index_of(uid)
        if not view.validator_permit[index]:
            return (
                f"uid {uid} has no validator permit on netuid {view.netuid} (stake {view.stake[index]:g} alpha; "
                f"the chain gives permits to the top stake holders) and the chain refuses weights without one; "
                f"challenges go on, and the permit is checked again after each metagraph sync"
            )
        return None

    def _maybe_sync(self) -> None:
        if time.monotonic() < self._next_sync:
            return
        try:
            view = self.chain.sync()
        except Exception as exc:  # noqa: BLE001 - a flaky chain must not stop challenges; the old view still works
            log.warning(
                "metagraph sync failed (%s: %s); keeping the view of block %d", type(exc).__name__, exc, self.view.block
            )
            self.monitor.metrics.record_error("sync")
            return
        self.view = self._apply(view)
        self._next_sync = time.monotonic() + self.config.neuron.sync_interval
        self.monitor.metrics.record_sync()
        uid = view.uid_of(self.hotkey)
        if uid is None:
            log.error(
                "hotkey %s is no longer registered on netuid %d: weights cannot be set", self.hotkey[:8], view.netuid
            )
        elif uid != self.uid:
            log.info("own uid changed from %s to %d", self.uid, uid)
        self.uid = uid
        log.debug("sync block=%d neurons=%d", view.block, view.n)

    # --- one step --------------------------------------------------------------------------------------------
    def step(self) -> StepResult | None:
        """Sync if due, run one challenge, save the state, log the step. None when no challenge could be drawn."""
        self._maybe_sync()
        result = self.runner.run(self.view)
        if result is None:
            return None
        if result.challenge is not None:
            started = time.perf_counter()
            if not self.store.save(self.scorer.snapshot(), self.weight_setter.last_success_block):
                self.monitor.metrics.record_error("state_save")
            result.timings.persistence = time.perf_counter() - started
        self.steps_done += 1
        self._report(result)
        return result

    def _report(self, result: StepResult) -> None:
        scores = self.scorer.scores
        registered = self.scorer.uids
        top = sorted(
            ((uid, float(scores[uid])) for uid in registered if scores[uid] > 0), key=lambda pair: (-pair[1], pair[0])
        )
        log.info(format_step(self.steps_done, result, top[:TOP_SCORES_LOGGED], self.runner.stats,
                             self.runner.video_stats if self.video is not None else None))
        metrics = self.monitor.metrics
        for response, reward in zip(result.responses, result.rewards, strict=True):
            metrics.record_request(_outcome(response.status, reward.kind), response.latency)
        metrics.set_scores({uid: float(scores[uid]) for uid in registered})
        metrics.record_step()
        self.monitor.beat(
            step=self.steps_done, block=result.block, uid=self.uid, kind=result.kind,
            queried=len(result.uids), answered=result.answered,
            last_weights_block=self.weight_setter.last_success_block,
            synthetic_cached=self.sampler.synthetic_cached(),
            challenge_kind=result.challenge.kind if result.challenge is not None else "none",
            kinds=self.runner.stats.summary(),
            modality=result.modality,
            video_kinds=self.runner.video_stats.summary() if self.video is not None else None,
            video_clips_cached=len(self.video.real) if self.video is not None else None,
        )

    def _safe_step(self) -> bool | None:
        """`step()` that never raises: True when it completed, None when no challenge was drawn, False on error."""
        try:
            return True if self.step() is not None else None
        except Exception:  # noqa: BLE001 - one bad step must never stop the validator
            log.exception(
                "step %d failed at block %d (%d neurons); the next step runs",
                self.steps_done + 1, self.view.block, self.view.n,
            )
            self.monitor.metrics.record_error("step")
            return False

    def _maybe_set_weights(self) -> None:
        """Nudge the weight setter (it decides in its own thread whether weights are due) and count its results."""
        try:
            self.weight_setter.maybe_set_weights()
            stats = self.weight_setter.stats
            seen_ok, seen_failed = self._weights_seen
            for _ in range(stats.successes - seen_ok):
                self.monitor.metrics.record_weights(True, stats.last_success_block)
            for _ in range(stats.failures - seen_failed):
                self.monitor.metrics.record_weights(False)
            self._weights_seen = (stats.successes, stats.failures)
        except Exception:  # noqa: BLE001
            log.exception("could not request weight setting")

    def _prefill(self, wanted: int, budget_s: float = 60.0) -> None:
        """Fill the real cache up to `wanted` images before the first step (bounded in time), so the first real
        challenges are not all drawn from the first handful of cached images. Each round that adds images is
        progress: it writes the heartbeat (`prefill_real_images`) and so keeps the watchdog from firing during
        start-up; a round that adds nothing ends the prefill."""
        deadline = time.monotonic() + budget_s
        added = 0
        while len(self.real_source) < wanted and time.monotonic() < deadline and not self.stop_event.is_set():
            round_added = self.real_source.fill_round()
            added += round_added
            if not round_added:
                break
            self.monitor.beat(prefill_real_images=len(self.real_source))
        log.info("real-image cache: %d images (%d added before the first step)", len(self.real_source), added)

    # --- loop ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Step until `stop()` or `--neuron.max_steps` completed steps; always releases everything at the end."""
        interval = float(self.config.neuron.step_interval)
        max_steps = int(self.config.neuron.max_steps)
        try:
            if self.real_source is not None:
                self._prefill(int(self.config.validator.prefill_images))
                self.real_source.start()
            if self.video is not None:
                self.video.real.start()
            self.weight_setter.start()
            while not self.stop_event.is_set():
                started = time.monotonic()
                outcome = self._safe_step()
                self._maybe_set_weights()
                if max_steps and self.steps_done >= max_steps:
                    log.info("completed %d steps (--neuron.max_steps); stopping", self.steps_done)
                    break
                if outcome is None:  # no image yet: the filler is working, look again soon
                    wait = max(MIN_WAIT_S, min(interval, NO_CHALLENGE_RETRY_S))
                else:
                    wait = interval - (time.monotonic() - started)
                    if outcome is False:
                        wait = max(wait, MIN_WAIT_S)
                self.stop_event.wait(max(0.0, wait))
        finally:
            self.close()

    def stop(self, *_: object) -> None:
        self.stop_event.set()

    def close(self) -> None:
        log.info("validator shutting down after %d steps", self.steps_done)
        if self.real_source is not None:
            self.real_source.stop(timeout=5.0)
        if self.video is not None:
            self.video.real.stop(timeout=5.0)
        self.weight_setter.stop()
        try:
            self.client.close()
        except Exception as exc:  # noqa: BLE001 - closing must not hide the reason we stop
            log.warning("closing the query client failed: %s", exc)
        self.monitor.close()
        self.chain.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config = build_config(parser, argv)
    problems = check_config(config)
    if problems:
        parser.error("; ".join(problems))
    setup_logging(config)
    validator = Validator(config)
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, validator.stop)
    try:
        validator.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
