"""BittensorChain: the real subtensor behind the `Chain` interface, every call bounded by one timeout.

Why the timeouts: a subtensor websocket can hang forever (node restart, network partition), and a validator stuck
in `set_weights` stops scoring, a miner stuck in `sync` stops refreshing its blacklist. This is the node's only
timeout layer for chain calls. Calls on one connection are serialised (the websocket is not safe for concurrent use);
a call's clock starts once it holds the connection, so time spent queued behind another call does not count. A call
that outlives the timeout is abandoned: the caller gets a ChainError, later calls get a fresh connection when this
object made it, and the abandoned connection is closed only once its call has returned, never under a call in flight.
"""

import concurrent.futures
import ipaddress
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import bittensor as bt
import numpy as np
from bittensor.utils.weight_utils import process_weights

from bitmind.chain.base import (
    Chain,
    ChainError,
    MetagraphView,
    WeightsRules,
    check_endpoint,
    check_public_endpoint,
    check_weights,
    hotkey_of,
)

__all__ = ["BittensorChain"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
_LOCK_POLL_S = 0.05  # how often a queued call looks whether the connection it waits for was replaced
T = TypeVar("T")


@dataclass
class _ServedAxon:
    """What `subtensor.serve_axon` reads from an Axon (wallet, external ip and port), without starting a server."""

    wallet: Any
    external_ip: str
    external_port: int


class _Connection:
    """One subtensor connection (made on first use when None) and the lock that serialises calls on it."""

    def __init__(self, subtensor: Any | None) -> None:
        self.subtensor = subtensor
        self.lock = threading.Lock()
        self.retired = False  # abandoned after a timeout, or closed: no new call may start on it


def _as_list(values: Any) -> list:
    """A numpy array, torch tensor or list from a metagraph as a plain Python list."""
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


def _as_int(value: Any) -> int:
    return int(np.asarray(value).reshape(-1)[0])


def _is_dev_endpoint(endpoint: str) -> bool:
    """True when the subtensor endpoint is on this machine or a private network (a local dev chain)."""
    host = urlparse(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return not ipaddress.ip_address(host).is_global
    except ValueError:
        return False


class BittensorChain(Chain):
    """`Chain` over `bt.Subtensor`. Pass `subtensor` to use an existing connection (never closed by this object, and
    used again after a timeout, since no other can be made)."""

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
        self._state_lock = threading.Lock()  # guards `_connection` and each connection's `retired`
        self._connection = _Connection(subtensor)

    # ---- the timeout machinery ----------------------------------------------------------------------------

    def _call(self, name: str, fn: Callable[[Any], T]) -> T:
        """Run `fn(subtensor)` in a worker thread; ChainError when it raises or outlives the timeout.

        The clock starts once the call holds the connection. Waiting for it is bounded too: the call holding it is
        abandoned by its own caller after at most `timeout`, which hands later calls a new connection.
        """
        connection = self._hold_connection()
        future: concurrent.futures.Future = concurrent.futures.Future()

        def work() -> None:
            result, failure = None, None
            try:
                if connection.subtensor is None:
                    connection.subtensor = bt.Subtensor(config=self._config)
                result = fn(connection.subtensor)
            except BaseException as error:  # handed to the caller, who turns it into ChainError
                failure = error
            self._release(connection)  # before the caller hears back, so its next call finds the connection free
            if failure is None:
                future.set_result(result)
            else:
                future.set_exception(failure)

        threading.Thread(target=work, name=f"chain-{name}", daemon=True).start()
        try:
            finished = concurrent.futures.wait([future], timeout=self.timeout).done
        except BaseException:  # interrupted while waiting: nobody else would ever abandon this call
            _close_in_background(self._retire(connection))
            raise
        if not finished:
            _close_in_background(self._retire(connection))
            log.warning("chain call %s timed out after %gs; abandoned it", name, self.timeout)
            raise ChainError(f"{name} timed out after {self.timeout:g}s")
        error = future.exception()
        if error is None:
            return future.result()
        if isinstance(error, ChainError) or not isinstance(error, Exception):
            raise error
        raise ChainError(f"{name} failed: {type(error).__name__}: {error}") from error

    def _hold_connection(self) -> _Connection:
        """Take the current connection's lock, following a replacement made while waiting."""
        while True:
            connection = self._connection
            if connection.lock.acquire(timeout=_LOCK_POLL_S):
                with self._state_lock:
                    if not connection.retired:
                        return connection
                connection.lock.release()

    def _release(self, connection: _Connection) -> None:
        """End of a call: free the connection, and close it if it was retired while the call ran."""
        with self._state_lock:
            close = connection.retired and self._owns_subtensor and connection.subtensor is not None
            connection.lock.release()
        if close:
            _close_quietly(connection.subtensor)

    def _retire(self, connection: _Connection) -> Any | None:
        """No new call starts on `connection`. Returns its owned subtensor for the caller to close when no call is
        in flight on it; otherwise the call in flight closes it when it returns."""
        with self._state_lock:
            connection.retired = True
            if self._connection is connection:
                self._connection = _Connection(None if self._owns_subtensor else connection.subtensor)
            idle = connection.lock.acquire(blocking=False)  # kept: a retired connection is never used again
        return connection.subtensor if idle and self._owns_subtensor else None

    def close(self) -> None:
        """Close an owned connection now, or after the call in flight on it returns."""
        idle = self._retire(self._connection)
        if idle is not None:
            _close_quietly(idle)

    # ---- chain interface ----------------------------------------------------------------------------------

    def block(self) -> int:
        return self._call("get_current_block", lambda sub: int(sub.get_current_block()))

    def sync(self) -> MetagraphView:
        def fetch(sub: Any) -> MetagraphView:
            metagraph = sub.metagraph(self.netuid)
            return MetagraphView(
                netuid=self.netuid,
                block=_as_int(metagraph.block),
                uids=[int(uid) for uid in _as_list(metagraph.uids)],
                hotkeys=[str(hotkey) for hotkey in metagraph.hotkeys],
                coldkeys=[str(coldkey) for coldkey in metagraph.coldkeys],
                stake=[float(stake) for stake in _as_list(metagraph.S)],  # alpha
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
        """Publish ip:port; an address validators cannot reach is refused, except against a local dev chain."""
        endpoint, _ = bt.Subtensor.setup_config(None, self._config)
        if _is_dev_endpoint(endpoint):
            check_endpoint(ip, port)
        else:
            check_public_endpoint(ip, port)
        served = _ServedAxon(wallet=wallet, external_ip=ip, external_port=port)

        def serve(sub: Any) -> None:
            ok, message = sub.serve_axon(
                netuid=self.netuid, axon=served, wait_for_inclusion=True, wait_for_finalization=False
            )
            if not ok:
                raise ChainError(f"serve_axon {ip}:{port} on netuid {self.netuid} rejected: {message}")

        self._call("serve_axon", serve)
        log.info("served axon at %s:%d on netuid %d", ip, port, self.netuid)

    def weights_rules(self, hotkey: str) -> WeightsRules:
        def read(sub: Any) -> WeightsRules:
            block = int(sub.get_current_block())
            version = sub.get_hyperparameter("WeightsVersionKey", netuid=self.netuid, block=block)
            rate_limit = sub.weights_rate_limit(self.netuid, block=block)
            if version is None or rate_limit is None:
                raise ChainError(f"netuid {self.netuid} does not exist on this chain")
            uid = sub.get_uid_for_hotkey_on_subnet(hotkey, self.netuid, block=block)
            since = None if uid is None else sub.blocks_since_last_update(self.netuid, uid, block=block)
            return WeightsRules(
                block=block,
                weights_version=int(version),
                rate_limit=int(rate_limit),
                blocks_since_update=None if since is None else int(since),
            )

        return self._call("weights_rules", read)

    def set_weights(
        self, wallet: "bt.Wallet", uids: Sequence[int], weights: Sequence[float], version_key: int
    ) -> tuple[bool, str]:
        """Apply the subnet's weight limits, then send ONE extrinsic (bittensor would retry up to 5 by default);
        (False, reason) on rejection, ChainError if unreachable."""
        problem = check_weights(uids, weights)
        if problem:
            return False, problem

        def submit(sub: Any) -> tuple[bool, str]:
            # What `process_weights_for_netuid` does, with the neuron count read from the chain instead of taken
            # from a whole metagraph: the subnet's min_allowed_weights and max_weight_limit applied now.
            limits = (sub.subnetwork_n(self.netuid), sub.min_allowed_weights(self.netuid),
                      sub.max_weight_limit(self.netuid))
            if None in limits:
                raise ChainError(f"netuid {self.netuid} does not exist on this chain")
            processed_uids, processed_weights = process_weights(
                uids=np.asarray(uids, dtype=np.int64),
                weights=np.asarray(weights, dtype=np.float32),
                num_neurons=limits[0],
                min_allowed_weights=limits[1],
                max_weight_limit=limits[2],
            )
            ok, message = sub.set_weights(
                wallet=wallet,
                netuid=self.netuid,
                uids=processed_uids,
                weights=processed_weights,
                version_key=version_key,
                max_attempts=1,
                wait_for_inclusion=True,
                wait_for_finalization=False,
            )
            return bool(ok), str(message) if message else ("weights set" if ok else "rate limited or rejected")

        ok, message = self._call("set_weights", submit)
        log.info("set_weights on netuid %d (%d uids, version_key %d): ok=%s %s", self.netuid, len(uids), version_key,
                 ok, message)
        return ok, message


def _close_in_background(subtensor: Any | None) -> None:
    """Close a connection abandoned after a timeout without waiting: closing a broken websocket may hang too."""
    if subtensor is not None:
        threading.Thread(target=_close_quietly, args=(subtensor,), name="chain-close", daemon=True).start()


def _close_quietly(subtensor: Any) -> None:
    try:
        subtensor.close()
    except Exception as error:  # closing a broken connection may fail; nothing left to do about it
        log.debug("closing subtensor failed: %s", error)
