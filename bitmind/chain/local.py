"""LocalChain: a whole subnet in one SQLite file, shared by the processes of a local network on one machine.

Why: miners, validators and the localnet orchestrator need a chain that behaves like subtensor where it matters
(uids, stake, validator permits, axon discovery, weights with subtensor's strict rate limit and required weights
version, blocks that advance with time) without a blockchain node. Stake is in alpha, like `metagraph.S`.
Every write runs in a `BEGIN IMMEDIATE` transaction in WAL mode with a busy timeout, so several processes writing
at once lose no update. The first process to open the file creates it and stores the chain's
parameters (genesis time, block time, limits) in it; later openers adopt the stored ones.
"""

import contextlib
import logging
import math
import operator
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import bittensor as bt
from bittensor.core.settings import version_as_int

from bitmind.chain.base import (
    Chain,
    ChainError,
    MetagraphView,
    WeightsRules,
    check_endpoint,
    check_weights,
    coldkey_of,
    hotkey_of,
)

__all__ = ["LocalChain", "LocalChainParams"]

log = logging.getLogger(__name__)

SCHEMA = "bitmind-localchain-1"
SQLITE_HEADER = b"SQLite format 3\x00"
MAX_KEY_LENGTH = 256
NULL_IP = "0.0.0.0"

_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE neurons (
    uid INTEGER PRIMARY KEY,
    hotkey TEXT NOT NULL UNIQUE,
    coldkey TEXT NOT NULL,
    stake REAL NOT NULL DEFAULT 0 CHECK (stake >= 0),
    registered_block INTEGER NOT NULL,
    axon_ip TEXT NOT NULL DEFAULT '0.0.0.0',
    axon_port INTEGER NOT NULL DEFAULT 0,
    axon_ip_type INTEGER NOT NULL DEFAULT 4,
    axon_protocol INTEGER NOT NULL DEFAULT 4,
    axon_version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE weights (
    validator_uid INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    weight REAL NOT NULL,
    PRIMARY KEY (validator_uid, uid)
);
CREATE TABLE weight_updates (
    validator_uid INTEGER PRIMARY KEY,
    block INTEGER NOT NULL,
    version_key INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class LocalChainParams:
    """The chain's constants, fixed when the file is created. `min_version_key` is the subnet's `weights_version`
    hyperparameter; `weights_rate_limit` its `weights_rate_limit` (weights are accepted once strictly more blocks
    than this have passed since the hotkey's last accepted ones)."""

    netuid: int
    genesis: float
    seconds_per_block: float
    weights_rate_limit: int
    max_uids: int
    max_validators: int
    min_version_key: int

    def validate(self) -> None:
        if not (math.isfinite(self.seconds_per_block) and self.seconds_per_block > 0):
            raise ChainError(f"seconds_per_block must be a positive number, got {self.seconds_per_block}")
        if not math.isfinite(self.genesis):
            raise ChainError(f"genesis must be a finite timestamp, got {self.genesis}")
        for name in ("netuid", "weights_rate_limit", "min_version_key"):
            if getattr(self, name) < 0:
                raise ChainError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_uids", "max_validators"):
            if getattr(self, name) < 1:
                raise ChainError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_meta(self) -> dict[str, str]:
        return {"schema": SCHEMA, **{key: repr(value) for key, value in asdict(self).items()}}

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> "LocalChainParams":
        try:
            return cls(
                netuid=int(meta["netuid"]),
                genesis=float(meta["genesis"]),
                seconds_per_block=float(meta["seconds_per_block"]),
                weights_rate_limit=int(meta["weights_rate_limit"]),
                max_uids=int(meta["max_uids"]),
                max_validators=int(meta["max_validators"]),
                min_version_key=int(meta["min_version_key"]),
            )
        except (KeyError, ValueError) as error:
            raise ChainError(f"corrupt LocalChain parameters ({type(error).__name__}: {error})") from error


def _check_key(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_LENGTH:
        raise ChainError(f"{name} must be a non-empty string of at most {MAX_KEY_LENGTH} characters, got {value!r}")
    return value


def _check_amount(name: str, value: object) -> float:
    try:
        amount = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise ChainError(f"{name} must be a number, got {value!r}") from error
    if not math.isfinite(amount):
        raise ChainError(f"{name} must be finite, got {value!r}")
    return amount


class LocalChain(Chain):
    """A subnet simulated in one SQLite file; safe to share between processes on one machine."""

    def __init__(
        self,
        path: str | Path,
        netuid: int = 34,
        seconds_per_block: float = 12.0,
        weights_rate_limit: int = 100,
        max_uids: int = 256,
        max_validators: int = 64,
        min_version_key: int = 0,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (or create) the chain at `path`. The limits apply only when this call creates the file.

        `timeout` is how long a write waits for another process's transaction; `clock` is injectable for tests.
        """
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ChainError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.path = Path(path).expanduser()
        self._clock = clock
        self._lock = threading.RLock()
        try:
            wanted = LocalChainParams(
                netuid=operator.index(netuid),
                genesis=float(clock()),
                seconds_per_block=float(seconds_per_block),
                weights_rate_limit=operator.index(weights_rate_limit),
                max_uids=operator.index(max_uids),
                max_validators=operator.index(max_validators),
                min_version_key=operator.index(min_version_key),
            )
        except (TypeError, ValueError) as error:
            raise ChainError(f"invalid LocalChain parameters: {error}") from error
        wanted.validate()
        self._conn = self._connect(float(timeout))
        try:
            self.params = self._open_or_create(wanted)
        except BaseException:
            self._conn.close()
            raise
        self.netuid = self.params.netuid

    # ---- file handling -------------------------------------------------------------------------------------

    def _connect(self, timeout: float) -> sqlite3.Connection:
        try:
            if self.path.is_dir():
                raise ChainError(f"local chain path {self.path} is a directory, not a file")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > 0:
                with self.path.open("rb") as handle:
                    if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                        raise ChainError(f"{self.path} is not a SQLite file, so not a LocalChain")
            conn = sqlite3.connect(
                str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except OSError as error:
            raise ChainError(f"cannot open local chain {self.path}: {error}") from error
        except sqlite3.Error as error:
            raise ChainError(f"cannot open local chain {self.path}: {error}") from error
        try:
            self._enable_wal(conn, deadline=time.monotonic() + timeout)
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as error:
            conn.close()
            raise ChainError(f"{self.path} is not a usable LocalChain file: {error}") from error
        except ChainError:
            conn.close()
            raise
        return conn

    def _enable_wal(self, conn: sqlite3.Connection, deadline: float) -> None:
        """Switch the file to WAL. SQLite's busy timeout does not cover this switch while another process is
        creating the file, so retry "database is locked" until the deadline."""
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
                continue
            if str(mode).lower() != "wal":
                raise ChainError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
            return

    def _open_or_create(self, wanted: LocalChainParams) -> LocalChainParams:
        with self._transaction("open", write=True) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                # statement by statement: executescript() would COMMIT and end this transaction
                for statement in _TABLES.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", wanted.to_meta().items())
                log.info(
                    "created local chain %s: netuid=%d seconds_per_block=%g weights_rate_limit=%d max_uids=%d "
                    "max_validators=%d min_version_key=%d",
                    self.path, wanted.netuid, wanted.seconds_per_block, wanted.weights_rate_limit,
                    wanted.max_uids, wanted.max_validators, wanted.min_version_key,
                )
                return wanted
            if "meta" not in tables or "neurons" not in tables:
                raise ChainError(f"{self.path} is a SQLite file of something else (tables: {sorted(tables)})")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema") != SCHEMA:
            raise ChainError(f"{self.path} is not a {SCHEMA} file (schema {meta.get('schema')!r})")
        stored = LocalChainParams.from_meta(meta)
        stored.validate()
        if stored.netuid != wanted.netuid:
            raise ChainError(f"{self.path} holds netuid {stored.netuid}, not the requested netuid {wanted.netuid}")
        ignored = {
            key: value
            for key, value in asdict(wanted).items()
            if key != "genesis" and value != getattr(stored, key)
        }
        if ignored:
            log.info("local chain %s already exists; keeping its parameters, ignoring %s", self.path, ignored)
        return stored

    @contextlib.contextmanager
    def _transaction(self, what: str, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction (IMMEDIATE for writes, so concurrent writers queue instead of failing)."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as error:
                raise ChainError(f"local chain {what} failed on {self.path}: {error}") from error

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- chain interface -----------------------------------------------------------------------------------

    def block(self) -> int:
        """floor((now - genesis) / seconds_per_block): blocks advance with wall time in every process alike."""
        return max(0, int((self._clock() - self.params.genesis) // self.params.seconds_per_block))

    def sync(self) -> MetagraphView:
        with self._transaction("sync", write=False) as conn:
            rows = conn.execute(
                "SELECT uid, hotkey, coldkey, stake, axon_ip, axon_port, axon_ip_type, axon_protocol, axon_version "
                "FROM neurons ORDER BY uid"
            ).fetchall()
        permitted = self._permitted_uids([(row[0], row[3]) for row in rows])
        return MetagraphView(
            netuid=self.netuid,
            block=self.block(),
            uids=[row[0] for row in rows],
            hotkeys=[row[1] for row in rows],
            coldkeys=[row[2] for row in rows],
            stake=[float(row[3]) for row in rows],
            validator_permit=[row[0] in permitted for row in rows],
            axons=[
                bt.AxonInfo(
                    version=version, ip=ip, port=port, ip_type=ip_type, hotkey=hotkey, coldkey=coldkey,
                    protocol=protocol,
                )
                for _, hotkey, coldkey, _, ip, port, ip_type, protocol, version in rows
            ],
        )

    def register(self, wallet: "bt.Wallet") -> int:
        return self.register_hotkey(hotkey_of(wallet), coldkey_of(wallet))

    def register_hotkey(self, hotkey: str, coldkey: str, stake: float = 0.0, uid: int | None = None) -> int:
        """Register `hotkey` and return its uid.

        Without `uid`: idempotent (a registered hotkey keeps its uid and stake); a new hotkey takes the next uid,
        or, when the subnet is full, replaces the lowest-stake neuron. With `uid`: the hotkey takes that uid,
        replacing its holder (stake, axon and weights of the uid reset), or takes the next free uid.
        """
        _check_key("hotkey", hotkey)
        _check_key("coldkey", coldkey)
        stake = _check_amount("stake", stake)
        if stake < 0:
            raise ChainError(f"stake must be >= 0, got {stake}")
        if uid is not None and (isinstance(uid, bool) or not isinstance(uid, int) or uid < 0):
            raise ChainError(f"uid must be a non-negative int, got {uid!r}")
        block = self.block()
        with self._transaction("register", write=True) as conn:
            current = conn.execute("SELECT uid FROM neurons WHERE hotkey = ?", (hotkey,)).fetchone()
            if current is not None:
                if uid is None or uid == current[0]:
                    return int(current[0])
                raise ChainError(f"hotkey {hotkey} is already registered at uid {current[0]}, not uid {uid}")
            count = conn.execute("SELECT COUNT(*) FROM neurons").fetchone()[0]
            if uid is None:
                if count < self.params.max_uids:
                    uid = count
                else:
                    uid = conn.execute("SELECT uid FROM neurons ORDER BY stake ASC, uid ASC LIMIT 1").fetchone()[0]
            elif uid > count or uid >= self.params.max_uids:
                raise ChainError(
                    f"uid {uid} is neither registered nor the next free uid ({count}; max_uids {self.params.max_uids})"
                )
            replaced = conn.execute("SELECT hotkey FROM neurons WHERE uid = ?", (uid,)).fetchone()
            conn.execute("DELETE FROM neurons WHERE uid = ?", (uid,))
            conn.execute("DELETE FROM weights WHERE validator_uid = ?", (uid,))
            conn.execute("DELETE FROM weight_updates WHERE validator_uid = ?", (uid,))
            conn.execute(
                "INSERT INTO neurons (uid, hotkey, coldkey, stake, registered_block) VALUES (?, ?, ?, ?, ?)",
                (uid, hotkey, coldkey, stake, block),
            )
        log.info(
            "registered hotkey %s at uid %d (block %d, stake %g alpha%s)",
            hotkey, uid, block, stake, f", replacing {replaced[0]}" if replaced else "",
        )
        return uid

    def add_stake(self, hotkey: str, amount: float) -> float:
        """Add `amount` alpha (negative to unstake) to a registered hotkey's stake; returns the new stake."""
        _check_key("hotkey", hotkey)
        amount = _check_amount("amount", amount)
        with self._transaction("add_stake", write=True) as conn:
            row = conn.execute("SELECT stake FROM neurons WHERE hotkey = ?", (hotkey,)).fetchone()
            if row is None:
                raise ChainError(f"add_stake: hotkey {hotkey} is not registered on netuid {self.netuid}")
            if row[0] + amount < 0:
                raise ChainError(f"add_stake: stake of {hotkey} would go negative ({row[0]} + {amount})")
            conn.execute("UPDATE neurons SET stake = stake + ? WHERE hotkey = ?", (amount, hotkey))
            return float(conn.execute("SELECT stake FROM neurons WHERE hotkey = ?", (hotkey,)).fetchone()[0])

    def serve_axon(self, wallet: "bt.Wallet", ip: str, port: int) -> None:
        ip_type = check_endpoint(ip, port)
        hotkey = hotkey_of(wallet)
        with self._transaction("serve_axon", write=True) as conn:
            updated = conn.execute(
                "UPDATE neurons SET axon_ip = ?, axon_port = ?, axon_ip_type = ?, axon_protocol = 4, "
                "axon_version = ? WHERE hotkey = ?",
                (ip, port, ip_type, version_as_int, hotkey),
            ).rowcount
        if not updated:
            raise ChainError(f"serve_axon: hotkey {hotkey} is not registered on netuid {self.netuid}")
        log.info("served axon of %s at %s:%d", hotkey, ip, port)

    def set_weights(
        self, wallet: "bt.Wallet", uids: Sequence[int], weights: Sequence[float], version_key: int
    ) -> tuple[bool, str]:
        """Check like subtensor does (registration, permit, version, uids, rate limit), then store L1-normalised."""
        problem = check_weights(uids, weights)
        if problem:
            return False, problem
        try:
            version_key = operator.index(version_key)
        except TypeError:
            return False, f"version_key must be an int, got {version_key!r}"
        block = self.block()
        problem = self._rules(block, None).version_problem(version_key)
        if problem:
            return False, problem
        try:
            hotkey = hotkey_of(wallet)
        except ChainError as error:
            return False, str(error)
        uid_list = [int(uid) for uid in uids]
        total = sum(float(weight) for weight in weights)
        normalised = [float(weight) / total for weight in weights]
        with self._transaction("set_weights", write=True) as conn:
            rows = conn.execute("SELECT uid, hotkey, stake FROM neurons").fetchall()
            own = next((row[0] for row in rows if row[1] == hotkey), None)
            if own is None:
                return False, f"hotkey {hotkey} is not registered on netuid {self.netuid}"
            if own not in self._permitted_uids([(row[0], row[2]) for row in rows]):
                return False, f"hotkey {hotkey} (uid {own}) has no validator permit"
            unknown = sorted(set(uid_list) - {row[0] for row in rows})
            if unknown:
                return False, f"unknown uids {unknown[:10]}"
            last = conn.execute("SELECT block FROM weight_updates WHERE validator_uid = ?", (own,)).fetchone()
            wait = self._rules(block, None if last is None else last[0]).blocks_to_wait()
            if wait:
                return False, f"rate limited: {wait} blocks left (weights_rate_limit {self.params.weights_rate_limit})"
            conn.execute("DELETE FROM weights WHERE validator_uid = ?", (own,))
            conn.executemany(
                "INSERT INTO weights (validator_uid, uid, weight) VALUES (?, ?, ?)",
                [(own, uid, weight) for uid, weight in zip(uid_list, normalised)],
            )
            conn.execute(
                "INSERT OR REPLACE INTO weight_updates (validator_uid, block, version_key) VALUES (?, ?, ?)",
                (own, block, version_key),
            )
        log.info("weights set by uid %d (%s) for %d uids at block %d", own, hotkey, len(uid_list), block)
        return True, f"weights set for {len(uid_list)} uids at block {block}"

    def weights_rules(self, hotkey: str) -> WeightsRules:
        block = self.block()
        return self._rules(block, self.last_weights_block(hotkey))

    def _rules(self, block: int, last_update: int | None) -> WeightsRules:
        return WeightsRules(
            block=block,
            weights_version=self.params.min_version_key,
            rate_limit=self.params.weights_rate_limit,
            blocks_since_update=None if last_update is None else block - last_update,
        )

    # ---- reads for the localnet leaderboard and tests ------------------------------------------------------

    def get_weights(self, validator_hotkey: str) -> dict[int, float]:
        """The last weights the validator set, uid -> normalised weight ({} when none)."""
        with self._transaction("get_weights", write=False) as conn:
            rows = conn.execute(
                "SELECT w.uid, w.weight FROM weights w JOIN neurons n ON n.uid = w.validator_uid "
                "WHERE n.hotkey = ? ORDER BY w.uid",
                (validator_hotkey,),
            ).fetchall()
        return {int(uid): float(weight) for uid, weight in rows}

    def last_weights_block(self, hotkey: str) -> int | None:
        """The block of the hotkey's last accepted set_weights, None when it never set any."""
        with self._transaction("last_weights_block", write=False) as conn:
            row = conn.execute(
                "SELECT u.block FROM weight_updates u JOIN neurons n ON n.uid = u.validator_uid WHERE n.hotkey = ?",
                (hotkey,),
            ).fetchone()
        return None if row is None else int(row[0])

    def _permitted_uids(self, uid_stakes: list[tuple[int, float]]) -> set[int]:
        """Validator permits: the `max_validators` highest-stake neurons with stake > 0 (ties to the lower uid), as
        subtensor gives them (there by alpha stake weight at each epoch)."""
        staked = sorted((item for item in uid_stakes if item[1] > 0), key=lambda item: (-item[1], item[0]))
        return {uid for uid, _ in staked[: self.params.max_validators]}
