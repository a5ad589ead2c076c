"""Shared test helpers: password-less wallets in a temp folder, an offline external-IP lookup, a free port.

Usage in a test module::

    from tests._wallets import free_port, make_wallet, offline_ip, wallet_factory  # noqa: F401 (fixtures)

    def test_x(wallet_factory, offline_ip):
        miner = wallet_factory("miner")
        validator = wallet_factory("validator")

`wallet_factory` and `offline_ip` are pytest fixtures; `make_wallet` and `free_port` are plain functions.
"""

import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("READ_ONLY", "1")

import bittensor as bt  # noqa: E402
import pytest  # noqa: E402

from bitmind.dev_wallets import make_wallet  # noqa: E402,F401 - re-exported for test modules
from bitmind.ports import free_port  # noqa: E402,F401 - re-exported for test modules

LOOPBACK = "127.0.0.1"


@pytest.fixture
def wallet_factory(tmp_path: Path) -> Callable[[str], bt.Wallet]:
    """`wallet_factory(name)` -> a password-less bt.Wallet in this test's temp folder."""
    root = tmp_path / "wallets"
    return lambda name: make_wallet(root, name)


@pytest.fixture
def offline_ip(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make bittensor's public-IP lookup answer 127.0.0.1 instead of asking the internet."""
    import bittensor.utils.networking as networking

    monkeypatch.setattr(networking, "get_external_ip", lambda: LOOPBACK)
    return LOOPBACK
