"""Who may query a miner, and in what order: decided by the caller's hotkey against the latest metagraph.

Bittensor hands blacklist/priority functions a synapse rebuilt from headers only, so the decision may use the
caller hotkey and chain state, never the request body.
"""

import threading

from bitmind.chain.base import MetagraphView

__all__ = ["CallerPolicy"]


class CallerPolicy:
    """Blacklist and priority from the metagraph: unregistered callers, callers without a validator permit
    (when forced) and callers under a stake threshold are refused with a reason."""

    def __init__(
        self,
        force_validator_permit: bool = False,
        min_stake: float = 0.0,
        allow_non_registered: bool = False,
    ) -> None:
        if not min_stake >= 0:
            raise ValueError(f"min_stake must be >= 0, got {min_stake}")
        if allow_non_registered and (force_validator_permit or min_stake > 0):
            # An unregistered caller has no permit and no stake to check: admitting it would let strangers past the
            # rule that refuses registered callers.
            raise ValueError("allow_non_registered cannot be combined with force_validator_permit or min_stake > 0")
        self.force_validator_permit = force_validator_permit
        self.min_stake = min_stake
        self.allow_non_registered = allow_non_registered
        self._lock = threading.Lock()
        self._neurons: dict[str, tuple[int, float, bool]] = {}

    def update(self, view: MetagraphView) -> None:
        """Adopt a fresh metagraph snapshot (called after every sync)."""
        neurons = {
            hotkey: (uid, float(stake), bool(permit))
            for uid, hotkey, stake, permit in zip(view.uids, view.hotkeys, view.stake, view.validator_permit)
        }
        with self._lock:
            self._neurons = neurons

    def lookup(self, hotkey: str | None) -> tuple[int, float, bool] | None:
        """(uid, stake, validator_permit) of a registered hotkey, else None."""
        with self._lock:
            return self._neurons.get(hotkey) if hotkey else None

    def blacklist(self, hotkey: str | None) -> tuple[bool, str]:
        if not hotkey:
            return True, "missing caller hotkey"
        neuron = self.lookup(hotkey)
        if neuron is None:
            if self.allow_non_registered:
                return False, "unregistered caller allowed"
            return True, f"unregistered hotkey {hotkey[:8]}"
        uid, stake, permit = neuron
        if self.force_validator_permit and not permit:
            return True, f"uid {uid} has no validator permit"
        if stake < self.min_stake:
            return True, f"uid {uid} stake {stake:.1f} below minimum {self.min_stake:.1f}"
        return False, f"uid {uid} allowed"

    def priority(self, hotkey: str | None) -> float:
        neuron = self.lookup(hotkey)
        return neuron[1] if neuron else 0.0
