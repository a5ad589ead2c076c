"""Password-less wallets and free ports for the local subnet, benchmarks and tests.

The keys derive from a name, so they guard nothing of value: never use these wallets for real TAO.
"""

import socket
from pathlib import Path

import bittensor as bt

__all__ = ["free_port", "make_wallet"]


def make_wallet(root: Path | str, name: str) -> bt.Wallet:
    """A password-less wallet under `root` whose keys derive from `name` (same name, same keys; fast, no mnemonic)."""
    wallet = bt.Wallet(name=name, hotkey="default", path=str(root))
    wallet.create_coldkey_from_uri(f"//{name}-coldkey", use_password=False, overwrite=True, suppress=True)
    wallet.create_hotkey_from_uri(f"//{name}-hotkey", use_password=False, overwrite=True, suppress=True)
    return wallet


def free_port() -> int:
    """A TCP port nobody listens on right now (on every interface, as uvicorn binds 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
