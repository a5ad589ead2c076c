"""The chain as the rest of the node sees it: one small interface, two implementations."""

import abc
from dataclasses import dataclass, field

import bittensor as bt

__all__ = ["Chain", "ChainError", "MetagraphView"]


class ChainError(RuntimeError):
    """A chain call failed or timed out; the message names the call."""


@dataclass
class MetagraphView:
    """A snapshot of one subnet's neurons, index i describing uid `uids[i]`."""

    netuid: int
    block: int
    uids: list[int] = field(default_factory=list)
    hotkeys: list[str] = field(default_factory=list)
    coldkeys: list[str] = field(default_factory=list)
    stake: list[float] = field(default_factory=list)
    validator_permit: list[bool] = field(default_factory=list)
    axons: list[bt.AxonInfo] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.uids)

    def uid_of(self, hotkey: str) -> int | None:
        """The uid registered to `hotkey`, or None when it is not registered."""
        try:
            return self.uids[self.hotkeys.index(hotkey)]
        except ValueError:
            return None

    def index_of(self, uid: int) -> int:
        return self.uids.index(uid)


class Chain(abc.ABC):
    """What a neuron needs from the chain. Implementations: `BittensorChain`, `LocalChain`."""

    netuid: int

    @abc.abstractmethod
    def block(self) -> int:
        """The current block number."""

    @abc.abstractmethod
    def sync(self) -> MetagraphView:
        """A fresh snapshot of the subnet's metagraph."""

    @abc.abstractmethod
    def register(self, wallet: "bt.Wallet") -> int:
        """Register the wallet's hotkey on the subnet and return its uid (idempotent)."""

    @abc.abstractmethod
    def serve_axon(self, wallet: "bt.Wallet", ip: str, port: int) -> None:
        """Publish the wallet's axon address so validators can find it."""

    @abc.abstractmethod
    def set_weights(
        self, wallet: "bt.Wallet", uids: list[int], weights: list[float], version_key: int
    ) -> tuple[bool, str]:
        """Set the wallet's weights on the subnet; returns (success, message), never raises on rejection."""

    def close(self) -> None:
        """Release connections; the default has none."""
