"""Which miners a validator step queries: serving ones, never itself, never a high-stake validator.

Why the stake rule: a neuron that holds a validator permit AND more stake than `vpermit_stake_limit` is a validator
(it earns through its own weights, and querying it wastes a slot of the sample); a permit holder with little stake is
still a miner, as in the reference subnet (limit 4096).
"""

import math

import numpy as np

from bitmind.chain.base import MetagraphView

__all__ = ["DEFAULT_VPERMIT_STAKE_LIMIT", "eligible_uids", "is_serving", "select_miners"]

DEFAULT_VPERMIT_STAKE_LIMIT = 4096.0
_UNSET_IPS = frozenset({"", "0.0.0.0", "::", "0", "[::]"})


def is_serving(axon: object) -> bool:
    """True when the neuron published a reachable-looking endpoint (an IP that is set and a port > 0)."""
    ip = str(getattr(axon, "ip", "") or "")
    port = getattr(axon, "port", 0)
    return ip not in _UNSET_IPS and isinstance(port, int) and 0 < port <= 65535


def eligible_uids(view: MetagraphView, own_hotkey: str, vpermit_stake_limit: float) -> list[int]:
    """Uids of `view` worth querying: serving, not `own_hotkey`, not a permit holder above the stake limit."""
    uids = []
    for index, uid in enumerate(view.uids):
        if view.hotkeys[index] == own_hotkey or not is_serving(view.axons[index]):
            continue
        stake = float(view.stake[index]) if index < len(view.stake) else 0.0
        permit = bool(view.validator_permit[index]) if index < len(view.validator_permit) else False
        if permit and not (stake <= vpermit_stake_limit):  # NaN stake counts as above the limit
            continue
        uids.append(int(uid))
    return uids


def select_miners(
    view: MetagraphView,
    sample_size: int,
    rng: np.random.Generator,
    own_hotkey: str,
    vpermit_stake_limit: float = DEFAULT_VPERMIT_STAKE_LIMIT,
) -> list[int]:
    """Up to `sample_size` eligible uids drawn uniformly without replacement (all of them when fewer), sorted."""
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1, got {sample_size}")
    if math.isnan(vpermit_stake_limit):
        raise ValueError("vpermit_stake_limit must be a number, got NaN")
    candidates = eligible_uids(view, own_hotkey, vpermit_stake_limit)
    if len(candidates) > sample_size:
        candidates = rng.choice(candidates, size=sample_size, replace=False).tolist()
    return sorted(int(uid) for uid in candidates)
