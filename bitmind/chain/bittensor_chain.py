"""BittensorChain: the real subtensor behind the `Chain` interface, every call bounded by a timeout.

Why the timeouts: a subtensor websocket can hang forever (node restart, network partition), and a validator stuck
in `set_weights` stops scoring, a miner stuck in `sync` stops refreshing its blacklist. Each call runs in a daemon
worker thread and the caller waits at most `timeout` seconds; a call that hangs is abandoned, and when this object
made the connection itself it reconnects on the next call.
"""

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import bittensor as bt
import numpy as np
from bittensor.utils.weight_utils import process_weights_for_netuid

from bitmind.chain.base import (
    Chain,
    ChainError,
    MetagraphView,
    check_endpoint,
    check_weights,
    hotkey_of,
)

__all__ = ["BittensorChain"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
T = TypeVar("T")


@dataclass
class _ServedAxon:
    """What `subtensor.serve_axon` reads from an Axon (wallet, external ip and port), without starting a server."""

    wallet: Any
    external_ip: str
    external_port: int


def _as_list(values: Any) -> list:
    """A numpy array, torch tensor or list from a metagraph as a plain Python list."""
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


def _as_int(value: Any) -> int:
    return int(np.asarray(value).reshape(-1)[0])


class BittensorChain(Chain):
    """`Chain` over `bt.Subtensor`. Pass `subtensor` to use an existing (or fake) connection."""

    def __init__(self, config: "bt.Config", subtensor: Any | None = None, timeout: float | None = None) -> None:
        chain_config = config.get("chain") or {}
        wanted = timeout if timeout is not None else chain_config.get("timeout", DEFAULT_TIMEOUT)
        try:
            self.timeout = float(wanted)
        except (TypeError, ValueError) as error:
            raise ChainError(f"chain timeout must be a number of seconds, got {wanted!r}") from error
        if not self.timeout > 0:
            raise ChainError(f"chain timeout must be positive, got {self.timeout}")
        if config.get("netuid") is None:
            raise ChainError("config has no netuid")
        self.netuid = int(config.netuid)
        self._config = config
        self._owns_subtensor = subtensor is None
        self._subtensor = subtensor
        self._call_lock = threading.Lock()  # the websocket is not safe for concurrent use
        self._metagraph: Any | None = None

    # ---- the timeout machinery ----------------------------------------------------------------------------

    def _call(self, name: str, fn: Callable[[Any], T]) -> T:
        """Run `fn(subtensor)` in a worker thread; ChainError when it raises or outlives the timeout."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_lock = self._call_lock

        def work() -> None:
            try:
                with call_lock:
                    future.set_result(fn(self._connected()))
            except BaseException as error:  # handed to the caller, who turns it into ChainError
                future.set_exception(error)

        threading.Thread(target=work, name=f"chain-{name}", daemon=True).start()
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            self._abandon(name)
            raise ChainError(f"{name} timed out after {self.timeout:g}s") from None
        except ChainError:
            raise
        except Exception as error:
            raise ChainError(f"{name} failed: {type(error).__name__}: {error}") from error

    def _connected(self) -> Any:
        if self._subtensor is None:
            self._subtensor = bt.Subtensor(config=self._config)
        return self._subtensor

    def _abandon(self, name: str) -> None:
        """Leave the hung call behind: later calls get a fresh lock, and a fresh connection if it was ours."""
        self._call_lock = threading.Lock()
        if self._owns_subtensor and self._subtensor is not None:
            stale, self._subtensor = self._subtensor, None
            threading.Thread(target=_close_quietly, args=(stale,), name="chain-close", daemon=True).start()
        log.warning("chain call %s timed out after %gs; abandoned it", name, self.timeout)

    def close(self) -> None:
        if self._owns_subtensor and self._subtensor is not None:
            stale, self._subtensor = self._subtensor, None
            _close_quietly(stale)

    # ---- chain interface ----------------------------------------------------------------------------------

    def block(self) -> int:
        return self._call("get_current_block", lambda sub: int(sub.get_current_block()))

    def sync(self) -> MetagraphView:
        def fetch(sub: Any) -> MetagraphView:
            metagraph = sub.metagraph(self.netuid)
            self._metagraph = metagraph
            return MetagraphView(
                netuid=self.netuid,
                block=_as_int(metagraph.block),
                uids=[int(uid) for uid in _as_list(metagraph.uids)],
                hotkeys=[str(hotkey) for hotkey in metagraph.hotkeys],
                coldkeys=[str(coldkey) for coldkey in metagraph.coldkeys],
                stake=[float(stake) for stake in _as_list(metagraph.S)],
                validator_permit=[bool(permit) for permit in _as_list(metagraph.validator_permit)],
                axons=list(metagraph.axons),
            )

        view = self._call("metagraph", fetch)
        log.info("synced netuid %d at block %d: %d neurons", self.netuid, view.block, view.n)
        return view

    def register(self, wallet: "bt.Wallet") -> int:
        """The hotkey's uid; burned-registers it first when it has none (this spends TAO)."""
        hotkey = hotkey_of(wallet)

        def register(sub: Any) -> int:
            uid = sub.get_uid_for_hotkey_on_subnet(hotkey, self.netuid)
            if uid is not None:
                return int(uid)
            ok, message = sub.burned_register(
                wallet=wallet, netuid=self.netuid, wait_for_inclusion=True, wait_for_finalization=False
            )
            if not ok:
                raise ChainError(f"burned_register of {hotkey} on netuid {self.netuid} rejected: {message}")
            uid = sub.get_uid_for_hotkey_on_subnet(hotkey, self.netuid)
            if uid is None:
                raise ChainError(f"burned_register of {hotkey} succeeded but netuid {self.netuid} has no uid for it")
            log.info("burned-registered %s on netuid %d as uid %d", hotkey, self.netuid, uid)
            return int(uid)

        return self._call("register", register)

    def serve_axon(self, wallet: "bt.Wallet", ip: str, port: int) -> None:
        check_endpoint(ip, port)
        endpoint = _ServedAxon(wallet=wallet, external_ip=ip, external_port=port)

        def serve(sub: Any) -> None:
            ok, message = sub.serve_axon(netuid=self.netuid, axon=endpoint)
            if not ok:
                raise ChainError(f"serve_axon {ip}:{port} on netuid {self.netuid} rejected: {message}")

        self._call("serve_axon", serve)
        log.info("served axon at %s:%d on netuid %d", ip, port, self.netuid)

    def set_weights(
        self, wallet: "bt.Wallet", uids: Sequence[int], weights: Sequence[float], version_key: int
    ) -> tuple[bool, str]:
        """Apply the subnet's weight limits, then set; (False, reason) on rejection, ChainError if unreachable."""
        problem = check_weights(uids, weights)
        if problem:
            return False, problem

        def submit(sub: Any) -> tuple[bool, str]:
            processed_uids, processed_weights = process_weights_for_netuid(
                uids=np.asarray(uids, dtype=np.int64),
                weights=np.asarray(weights, dtype=np.float32),
                netuid=self.netuid,
                subtensor=sub,
                metagraph=self._metagraph,
            )
            ok, message = sub.set_weights(
                wallet=wallet,
                netuid=self.netuid,
                uids=processed_uids,
                weights=processed_weights,
                version_key=version_key,
                wait_for_inclusion=True,
                wait_for_finalization=False,
            )
            return bool(ok), str(message) if message else ("weights set" if ok else "rate limited or rejected")

        ok, message = self._call("set_weights", submit)
        log.info("set_weights on netuid %d (%d uids, version_key %d): ok=%s %s", self.netuid, len(uids), version_key,
                 ok, message)
        return ok, message


def _close_quietly(subtensor: Any) -> None:
    try:
        subtensor.close()
    except Exception as error:  # closing a broken connection may fail; nothing left to do about it
        log.debug("closing subtensor failed: %s", error)
