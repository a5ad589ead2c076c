"""The chain layer: `make_chain(config)` gives the backend that `--chain` names; nothing else needs to know which."""

from typing import Any

import bittensor as bt

from bitmind.chain.base import Chain, ChainError, MetagraphView
from bitmind.chain.local import LocalChain, LocalChainParams

__all__ = ["BittensorChain", "Chain", "ChainError", "LocalChain", "LocalChainParams", "MetagraphView", "make_chain"]


def make_chain(config: "bt.Config") -> Chain:
    """LocalChain for `--chain local` (the SQLite file at `--chain.path`), else the real subtensor."""
    chain_config = config.get("chain") or {}
    backend = chain_config.get("backend", "bittensor")
    if backend == "local":
        if not chain_config.get("path"):
            raise ChainError("--chain local needs --chain.path (the SQLite file of the local chain)")
        return LocalChain(
            chain_config["path"],
            netuid=int(config.netuid),
            seconds_per_block=float(chain_config.get("seconds_per_block", 12.0)),
            timeout=float(chain_config.get("timeout", 30.0)),
        )
    if backend == "bittensor":
        from bitmind.chain.bittensor_chain import BittensorChain

        return BittensorChain(config)
    raise ChainError(f"unknown chain backend {backend!r} (expected 'bittensor' or 'local')")


def __getattr__(name: str) -> Any:
    """`BittensorChain` is imported on first use, so local-only processes skip its imports."""
    if name == "BittensorChain":
        from bitmind.chain.bittensor_chain import BittensorChain

        return BittensorChain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
