"""Miner scores: rolling answer histories keyed by hotkey, an EMA of rewards per uid, and the weight vector.

Decisions (tested in tests/test_scoring_state.py):
- Histories belong to HOTKEYS, scores to UIDS. `sync()` compares the metagraph's hotkey at each uid with the one
  seen before: a changed hotkey (a new miner took the slot) zeroes that uid's score and starts a fresh history;
  every other uid keeps both. Histories of hotkeys that left the subnet are dropped. The metagraph may grow (new
  uids start at 0) or shrink (uids past the end are dropped).
- EMA: `score = alpha * reward + (1 - alpha) * score` for the uids queried in a step; the others keep their score.
- `weights()`: scores clipped at >= 0 (NaN -> 0), L1-normalised over the registered uids. When every score is 0
  (a fresh validator) the weights are UNIFORM over the registered uids rather than none: the chain's own weight
  processing (`process_weights_for_netuid`) turns an all-zero vector into the same uniform vector, and a validator
  that sets no weights at all looks inactive.
- Thread-safe: the weight setter's thread reads `weights()` while the challenge loop scores.
- Modalities (image, video): each miner keeps one history per modality, and a valid answer's reward is
  `sum over modalities of weight_m * (0.5 * max(0, MCC_m) + 0.5 * accuracy_m)` over each modality's own windows, the
  weights being the challenge mix (`--validator.video_share`, 5 % video by default as the founding notes set). A
  miner that never answers video keeps an empty video history, so its rewards top out at the image weight.
  A video answer of -1 (a miner that refuses video) is a non-answer like -1 on an image: 0 that step, no history
  change; a video answer that is not a number in [0, 1] is invalid (penalty 0), exactly as for images.
"""

import argparse
import threading
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bitmind.chain.base import MetagraphView
from validator.reward import (
    DEFAULT_HISTORY_ACC,
    DEFAULT_HISTORY_MCC,
    AnswerKind,
    Entry,
    Reward,
    compute_reward,
    window_metrics,
    window_reward,
)
from validator.state import MinerRecordState, ScorerState

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_VIDEO_SHARE",
    "MODALITIES",
    "MinerStats",
    "Scorer",
    "ScoringParams",
    "add_scoring_args",
    "modality_weights",
]

DEFAULT_ALPHA = 0.05
MODALITIES = ("image", "video")
DEFAULT_VIDEO_SHARE = 0.05  # the founding notes: 5 % video, 95 % image


def modality_weights(video_share: float) -> dict[str, float]:
    """The reward weights of a challenge mix with `video_share` video challenges; ValueError outside [0, 1]."""
    if not 0.0 <= video_share <= 1.0:
        raise ValueError(f"video share must be in [0, 1], got {video_share!r}")
    return {"image": 1.0 - video_share, "video": float(video_share)}


def add_scoring_args(parser: argparse.ArgumentParser) -> None:
    """`--neuron.alpha`, `--neuron.history_mcc`, `--neuron.history_acc`."""
    parser.add_argument(
        "--neuron.alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help="EMA factor in (0, 1]: score = alpha * reward + (1 - alpha) * score.",
    )
    parser.add_argument(
        "--neuron.history_mcc",
        type=int,
        default=DEFAULT_HISTORY_MCC,
        help="How many of a miner's last valid predictions the MCC half of the reward is computed over.",
    )
    parser.add_argument(
        "--neuron.history_acc",
        type=int,
        default=DEFAULT_HISTORY_ACC,
        help="How many of a miner's last valid predictions the accuracy half of the reward is computed over.",
    )
    parser.add_argument(
        "--validator.video_share",
        type=float,
        default=DEFAULT_VIDEO_SHARE,
        help="Share in [0, 1] of challenges that are video clips, and the weight of a miner's video windows in "
             "every reward (the image windows weigh the rest). 0: images only.",
    )


@dataclass(frozen=True)
class MinerStats:
    """One uid's figures for logs and the leaderboard; accuracy and MCC over its whole kept history."""

    uid: int
    hotkey: str
    score: float
    queried: int
    answered: int
    invalid: int
    history_len: int
    accuracy: float
    mcc: float
    video_history_len: int = 0
    video_accuracy: float = 0.0
    video_mcc: float = 0.0


@dataclass
class _MinerRecord:
    history: deque[Entry]  # image answers
    queried: int = 0
    answered: int = 0
    invalid: int = 0
    video_history: deque[Entry] = field(default_factory=deque)

    def of(self, modality: str) -> deque[Entry]:
        return self.video_history if modality == "video" else self.history


@dataclass(frozen=True)
class ScoringParams:
    """The scorer's settings (validated): EMA factor and the two reward windows."""

    alpha: float
    history_mcc: int
    history_acc: int
    maxlen: int = field(init=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha <= 1.0):
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")
        for name in ("history_mcc", "history_acc"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        object.__setattr__(self, "maxlen", max(self.history_mcc, self.history_acc))


class Scorer:
    """Rewards answers, keeps histories and EMA scores, and hands out the weight vector."""

    def __init__(
        self,
        alpha: float = DEFAULT_ALPHA,
        history_mcc: int = DEFAULT_HISTORY_MCC,
        history_acc: int = DEFAULT_HISTORY_ACC,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        self.params = ScoringParams(alpha, history_mcc, history_acc)
        weights = {"image": 1.0} if weights is None else dict(weights)
        if set(weights) - set(MODALITIES) or any(not 0.0 <= w <= 1.0 for w in weights.values()) or not any(
            weights.values()
        ):
            raise ValueError(f"modality weights must map {MODALITIES} to [0, 1] and not all be 0, got {weights}")
        self.modality_weights = {m: w / sum(weights.values()) for m, w in weights.items() if w > 0}
        self._lock = threading.RLock()
        self._scores = np.zeros(0, dtype=np.float64)
        self._hotkeys: list[str] = []
        self._records: dict[str, _MinerRecord] = {}
        self._step = 0

    @staticmethod
    def _config_params(config) -> dict:
        return dict(
            alpha=config.neuron.alpha,
            history_mcc=config.neuron.history_mcc,
            history_acc=config.neuron.history_acc,
            weights=modality_weights(config.validator.video_share),
        )

    @classmethod
    def from_config(cls, config, snapshot: ScorerState | None = None) -> "Scorer":
        """A scorer with the `--neuron.*` flags, restored from `snapshot` when there is one."""
        params = cls._config_params(config)
        return cls.from_snapshot(snapshot, **params) if snapshot is not None else cls(**params)

    @classmethod
    def check_config(cls, config) -> list[str]:
        """What is wrong with the scoring flags, checked by building a scorer from them: at parse time, before the
        wallet and the chain, instead of a traceback after them."""
        try:
            cls(**cls._config_params(config))
        except ValueError as exc:
            return [f"scoring flags (--neuron.alpha, --neuron.history_mcc, --neuron.history_acc): {exc}"]
        return []

    @classmethod
    def from_snapshot(cls, snapshot: ScorerState, **params) -> "Scorer":
        """Rebuild a scorer from a saved `ScorerState` (histories longer than the window keep their newest end)."""
        scorer = cls(**params)
        scorer._scores = np.array(snapshot.scores, dtype=np.float64)
        scorer._hotkeys = list(snapshot.hotkeys)
        scorer._step = snapshot.step
        registered = set(scorer._hotkeys)
        for hotkey, record in snapshot.miners.items():
            if hotkey in registered:
                scorer._records[hotkey] = _MinerRecord(
                    deque(record.history, maxlen=scorer.params.maxlen),
                    record.queried,
                    record.answered,
                    record.invalid,
                    deque(record.video_history, maxlen=scorer.params.maxlen),
                )
        return scorer

    # --- read-only views -------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """How many challenges have been scored."""
        return self._step

    @property
    def scores(self) -> np.ndarray:
        with self._lock:
            return self._scores.copy()

    @property
    def hotkeys(self) -> list[str]:
        with self._lock:
            return list(self._hotkeys)

    @property
    def uids(self) -> list[int]:
        """Registered uids (a uid missing from the last metagraph has an empty hotkey)."""
        with self._lock:
            return [uid for uid, hotkey in enumerate(self._hotkeys) if hotkey]

    def history(self, uid: int) -> list[Entry]:
        with self._lock:
            return list(self._record(uid).history)

    # --- updates ---------------------------------------------------------------------------------------------
    def sync(self, metagraph: MetagraphView) -> list[int]:
        """Align with a fresh metagraph; returns the uids whose hotkey changed (their score and history reset)."""
        if len(metagraph.uids) != len(metagraph.hotkeys):
            raise ValueError(f"metagraph has {len(metagraph.uids)} uids but {len(metagraph.hotkeys)} hotkeys")
        if any(isinstance(uid, bool) or not isinstance(uid, int) or uid < 0 for uid in metagraph.uids):
            raise ValueError("metagraph uids must be non-negative integers")
        size = max(metagraph.uids) + 1 if metagraph.uids else 0
        hotkeys = [""] * size
        for uid, hotkey in zip(metagraph.uids, metagraph.hotkeys):
            hotkeys[uid] = hotkey
        with self._lock:
            scores = np.zeros(size, dtype=np.float64)
            kept = min(size, len(self._scores))
            scores[:kept] = self._scores[:kept]
            changed = [uid for uid in range(kept) if self._hotkeys[uid] != hotkeys[uid]]
            for uid in changed:  # a new hotkey, or a uid missing from this metagraph
                scores[uid] = 0.0
            fresh = {hotkeys[uid] for uid in changed} | set(hotkeys[kept:])
            registered = set(hotkeys)
            self._records = {
                hotkey: record
                for hotkey, record in self._records.items()
                if hotkey in registered and hotkey not in fresh
            }
            self._scores, self._hotkeys = scores, hotkeys
        return [uid for uid in changed if hotkeys[uid]]

    def score_challenge(
        self,
        label: int,
        uids: Sequence[int],
        predictions: Sequence[object],
        statuses: Sequence[object] | None = None,
        modality: str = "image",
    ) -> list[Reward]:
        """Reward every queried uid's answer to one challenge and fold the rewards into the EMA scores.

        `statuses` are the transport's status codes (200 = answered; None means all 200). `modality` says which
        history the answer joins; a valid answer's reward combines every weighted modality's windows. Miner input
        never raises; mismatched lengths, duplicate or unregistered uids, or an unknown modality are the caller's
        bug and raise ValueError.
        """
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        uids = [int(uid) for uid in uids]
        statuses = [200] * len(uids) if statuses is None else list(statuses)
        if not len(uids) == len(predictions) == len(statuses):
            raise ValueError(f"{len(uids)} uids, {len(predictions)} predictions, {len(statuses)} statuses")
        if len(set(uids)) != len(uids):
            raise ValueError("a uid appears twice in one challenge")
        params = self.params
        with self._lock:
            records = [self._record(uid, create=True) for uid in uids]
            rewards = []
            for record, prediction, status in zip(records, predictions, statuses):
                reward = compute_reward(
                    label, prediction, record.of(modality), status, params.history_mcc, params.history_acc
                )
                if reward.kind is AnswerKind.VALID:
                    reward = self._combined(record, modality, reward)
                record.queried += 1
                record.answered += reward.kind is AnswerKind.VALID
                record.invalid += reward.kind is AnswerKind.INVALID
                rewards.append(reward)
            if uids:
                values = np.array([reward.value for reward in rewards], dtype=np.float64)
                updated = params.alpha * values + (1.0 - params.alpha) * self._scores[uids]
                self._scores[uids] = np.clip(updated, 0.0, 1.0)
            self._step += 1
        return rewards

    def _combined(self, record: _MinerRecord, modality: str, reward: Reward) -> Reward:
        """`reward` (of `modality`'s windows) weighted with the miner's other modalities' window rewards."""
        if self.modality_weights == {modality: 1.0}:
            return reward
        value = 0.0
        for other, weight in self.modality_weights.items():
            own = reward.value if other == modality else window_reward(
                record.of(other), self.params.history_mcc, self.params.history_acc
            )[0]
            value += weight * own
        return Reward(value, reward.kind, reward.mcc, reward.accuracy)

    # --- outputs ---------------------------------------------------------------------------------------------
    def weights(self, among: Collection[int] | None = None) -> tuple[list[int], list[float]]:
        """(uids, weights) summing to 1 over the registered uids; empty if none.

        With `among` (the miners a validator can query now), every other uid gets 0: a miner that stops serving its
        axon is never queried again, so its score would stay frozen and keep earning without an answer. Uniform over
        `among` (over every registered uid when it holds none of them) when their scores are all 0."""
        with self._lock:
            uids = [uid for uid, hotkey in enumerate(self._hotkeys) if hotkey]
            raw = self._scores[uids]
        if not uids:
            return [], []
        counted = np.isin(uids, list(among)) if among is not None else np.ones(len(uids), dtype=bool)
        if not counted.any():
            counted[:] = True
        raw = np.where(counted, np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0), 0.0)
        total = raw.sum()
        weights = raw / total if total > 0 else counted / counted.sum()
        return uids, weights.tolist()

    def stats(self, uid: int) -> MinerStats:
        with self._lock:
            record = self._record(uid)
            mcc, accuracy = window_metrics(record.history)
            video_mcc, video_accuracy = window_metrics(record.video_history)
            return MinerStats(
                uid=uid,
                hotkey=self._hotkeys[uid],
                score=float(self._scores[uid]),
                queried=record.queried,
                answered=record.answered,
                invalid=record.invalid,
                history_len=len(record.history),
                accuracy=accuracy,
                mcc=mcc,
                video_history_len=len(record.video_history),
                video_accuracy=video_accuracy,
                video_mcc=video_mcc,
            )

    def all_stats(self) -> list[MinerStats]:
        """Stats of every registered uid, best score first."""
        return sorted((self.stats(uid) for uid in self.uids), key=lambda s: (-s.score, s.uid))

    def snapshot(self) -> ScorerState:
        with self._lock:
            return ScorerState(
                step=self._step,
                scores=self._scores.tolist(),
                hotkeys=list(self._hotkeys),
                miners={
                    hotkey: MinerRecordState(
                        history=list(record.history),
                        queried=record.queried,
                        answered=record.answered,
                        invalid=record.invalid,
                        video_history=list(record.video_history),
                    )
                    for hotkey, record in self._records.items()
                },
            )

    def _record(self, uid: int, create: bool = False) -> _MinerRecord:
        if not 0 <= uid < len(self._hotkeys) or not self._hotkeys[uid]:
            raise ValueError(f"uid {uid} is not in the last synced metagraph")
        hotkey = self._hotkeys[uid]
        record = self._records.get(hotkey)
        if record is None:
            record = _MinerRecord(deque(maxlen=self.params.maxlen), video_history=deque(maxlen=self.params.maxlen))
            if create:
                self._records[hotkey] = record
        return record
