"""The chain as the rest of the node sees it: one small interface, two implementations."""

import abc
import ipaddress
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import bittensor as bt

__all__ = [
    "Chain",
    "ChainError",
    "MetagraphView",
    "WeightsRules",
    "check_endpoint",
    "check_public_endpoint",
    "check_weights",
    "coldkey_of",
    "hotkey_of",
]


class ChainError(RuntimeError):
    """A chain call failed or timed out; the message names the call."""


@dataclass
class MetagraphView:
    """A snapshot of one subnet's neurons, index i describing uid `uids[i]`.

    `stake` is `metagraph.S`: the subnet's stake weight in ALPHA units (alpha stake plus a TAO-weighted share of root
    stake), not TAO; every stake threshold compared with it is in alpha too.
    """

    netuid: int
    block: int
    uids: list[int] = field(default_factory=list)
    hotkeys: list[str] = field(default_factory=list)
    coldkeys: list[str] = field(default_factory=list)
    stake: list[float] = field(default_factory=list)  # alpha, not TAO
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

    def require_uid(self, hotkey: str, wallet_name: str, wallet_hotkey: str) -> int:
        """The uid of a neuron's own hotkey; a neuron cannot run unregistered, so it exits with the command to fix it."""
        uid = self.uid_of(hotkey)
        if uid is None:
            raise SystemExit(
                f"hotkey {hotkey} is not registered on netuid {self.netuid}: run `btcli subnet register --netuid "
                f"{self.netuid} --wallet.name {wallet_name} --wallet.hotkey {wallet_hotkey}` first"
            )
        return uid

    def index_of(self, uid: int) -> int:
        return self.uids.index(uid)


@dataclass(frozen=True)
class WeightsRules:
    """What the subnet requires of one hotkey's next set_weights, read from the chain at `block`.

    The chain accepts weights only when `version_key >= weights_version` (0: any key) and strictly more than
    `rate_limit` blocks have passed since the hotkey's last accepted weights (`blocks_since_update`, None when it
    never set any). Checking both before sending saves an extrinsic the chain would refuse.
    """

    block: int
    weights_version: int
    rate_limit: int
    blocks_since_update: int | None

    def blocks_to_wait(self) -> int:
        """Blocks until the rate limit lets this hotkey set weights (0: it may now)."""
        if self.blocks_since_update is None:
            return 0
        return max(0, self.rate_limit + 1 - self.blocks_since_update)

    def version_problem(self, version_key: int) -> str | None:
        """Why the chain would refuse `version_key`, naming both numbers; None when it is accepted."""
        if version_key >= self.weights_version:
            return None
        return (
            f"the subnet requires weights version_key >= {self.weights_version} (its weights_version "
            f"hyperparameter) but this node sends {version_key}: the chain refuses these weights; update the node "
            f"(git pull, then reinstall) and restart it"
        )


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
    def weights_rules(self, hotkey: str) -> WeightsRules:
        """The subnet's weights version, its rate limit and the hotkey's blocks since its last weights."""

    @abc.abstractmethod
    def set_weights(
        self, wallet: "bt.Wallet", uids: list[int], weights: list[float], version_key: int
    ) -> tuple[bool, str]:
        """Set the wallet's weights on the subnet with at most one extrinsic; returns (success, message), never
        raises on rejection."""

    def close(self) -> None:
        """Release connections; the default has none."""

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def hotkey_of(wallet: "bt.Wallet") -> str:
    """The wallet's hotkey ss58 address; a wallet whose hotkey cannot be read is a ChainError."""
    try:
        return str(wallet.hotkey.ss58_address)
    except Exception as error:  # keyfile missing, locked, malformed
        raise ChainError(f"cannot read the wallet's hotkey: {type(error).__name__}: {error}") from error


def coldkey_of(wallet: "bt.Wallet") -> str:
    """The wallet's public coldkey ss58 address (no password needed)."""
    try:
        return str(wallet.coldkeypub.ss58_address)
    except Exception as error:
        raise ChainError(f"cannot read the wallet's coldkeypub: {type(error).__name__}: {error}") from error


def check_endpoint(ip: str, port: int) -> int:
    """Validate an axon address before it goes on chain; returns the IP version (4 or 6)."""
    try:
        address = ipaddress.ip_address(ip)
    except (TypeError, ValueError) as error:
        raise ChainError(f"serve_axon: invalid ip {ip!r}") from error
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ChainError(f"serve_axon: port must be an int in 1..65535, got {port!r}")
    return address.version


def check_public_endpoint(ip: str, port: int) -> None:
    """`check_endpoint`, and refuse an address other machines cannot reach (loopback, unspecified, private, ...).

    Why: the chain stores whatever is served, validators then call that address and fail, and the miner never learns
    why it gets no traffic. An offline public-IP lookup falls back to 127.0.0.1, which is how this usually happens.
    """
    check_endpoint(ip, port)
    address = ipaddress.ip_address(ip)
    if address.is_global:
        return
    if address.is_loopback:
        kind = "a loopback"
    elif address.is_unspecified:
        kind = "an unspecified"
    elif address.is_private:
        kind = "a private"
    else:
        kind = "a non-public"
    raise ChainError(
        f"serve_axon: {ip} is {kind} address that validators cannot reach; set --axon.external_ip "
        f"(AXON_EXTERNAL_IP in the env file) to this machine's public IP"
    )


def check_weights(uids: Sequence[int], weights: Sequence[float]) -> str | None:
    """Why (uids, weights) cannot be set as weights, or None when they can. Shared by both chains."""
    try:
        uid_list, weight_list = list(uids), [float(w) for w in weights]
    except (TypeError, ValueError) as error:
        return f"uids and weights must be sequences of numbers: {error}"
    if len(uid_list) != len(weight_list):
        return f"uids and weights differ in length ({len(uid_list)} != {len(weight_list)})"
    if not uid_list:
        return "no weights given"
    try:
        if any(isinstance(u, bool) for u in uid_list):
            raise TypeError
        uid_ints = [operator.index(u) for u in uid_list]
    except TypeError:
        return "uids must be integers"
    if min(uid_ints) < 0:
        return "uids must be non-negative"
    if len(set(uid_ints)) != len(uid_ints):
        return "duplicate uids"
    if any(not math.isfinite(w) for w in weight_list):
        return "weights must be finite (NaN or inf given)"
    if any(w < 0 for w in weight_list):
        return "weights must be non-negative"
    if sum(weight_list) <= 0:
        return "weights sum to zero"
    return None
