"""Password-less wallets for the local subnet, benchmarks and tests.

The keys derive from a name, so they guard nothing of value: never use these wallets for real TAO.
"""

from pathlib import Path

import bittensor as bt

__all__ = ["make_wallet"]


def make_wallet(root: Path | str, name: str) -> bt.Wallet:
    """A password-less wallet under `root` whose keys derive from `name` (same name, same keys; fast, no mnemonic)."""
    wallet = bt.Wallet(name=name, hotkey="default", path=str(root))
    wallet.create_coldkey_from_uri(f"//{name}-coldkey", use_password=False, overwrite=True, suppress=True)
    wallet.create_hotkey_from_uri(f"//{name}-hotkey", use_password=False, overwrite=True, suppress=True)
    return wallet
