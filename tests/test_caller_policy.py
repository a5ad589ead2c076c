"""Blacklist and priority decisions of the miner, from the metagraph."""

import pytest

from bitmind.caller_policy import CallerPolicy
from bitmind.chain.base import MetagraphView


def _view() -> MetagraphView:
    return MetagraphView(
        netuid=34,
        block=10,
        uids=[0, 1, 2],
        hotkeys=["validator-hotkey", "small-validator", "miner-hotkey"],
        coldkeys=["c0", "c1", "c2"],
        stake=[5000.0, 20.0, 0.0],
        validator_permit=[True, True, False],
    )


def _policy(**kwargs) -> CallerPolicy:
    policy = CallerPolicy(**kwargs)
    policy.update(_view())
    return policy


def test_registered_caller_is_allowed_and_prioritised_by_stake():
    policy = _policy()
    assert policy.blacklist("validator-hotkey") == (False, "uid 0 allowed")
    assert policy.priority("validator-hotkey") == 5000.0
    assert policy.priority("small-validator") == 20.0


@pytest.mark.parametrize("hotkey", [None, "", "5Unknown"])
def test_missing_or_unregistered_caller_is_refused(hotkey):
    refused, reason = _policy().blacklist(hotkey)
    assert refused and ("unregistered" in reason or "missing" in reason)
    assert _policy().priority(hotkey) == 0.0


def test_unregistered_caller_allowed_only_when_configured():
    assert _policy(allow_non_registered=True).blacklist("5Unknown")[0] is False


def test_force_validator_permit():
    policy = _policy(force_validator_permit=True)
    assert policy.blacklist("miner-hotkey") == (True, "uid 2 has no validator permit")
    assert policy.blacklist("validator-hotkey")[0] is False
    assert _policy().blacklist("miner-hotkey")[0] is False


def test_min_stake():
    policy = _policy(min_stake=100.0)
    refused, reason = policy.blacklist("small-validator")
    assert refused and "below minimum" in reason
    assert policy.blacklist("validator-hotkey")[0] is False


def test_update_forgets_deregistered_hotkeys():
    policy = _policy()
    view = _view()
    view.hotkeys[2] = "new-miner"
    policy.update(view)
    assert policy.blacklist("miner-hotkey")[0] is True
    assert policy.blacklist("new-miner")[0] is False


def test_negative_min_stake_rejected():
    with pytest.raises(ValueError):
        CallerPolicy(min_stake=-1)
    with pytest.raises(ValueError):
        CallerPolicy(min_stake=float("nan"))


@pytest.mark.parametrize("strict", [{"force_validator_permit": True}, {"min_stake": 10.0}])
def test_strangers_cannot_be_admitted_past_a_permit_or_stake_rule(strict):
    with pytest.raises(ValueError, match="cannot be combined"):
        CallerPolicy(allow_non_registered=True, **strict)
