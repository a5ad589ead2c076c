"""LocalChain: the SQLite-backed subnet shared by the processes of a local network."""

import math
import multiprocessing
import socket
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import bittensor as bt
import numpy as np
import pytest

from bitmind.chain import Chain, ChainError, LocalChain, make_chain
from bitmind.config import add_chain_args, build_config, new_parser
from bitmind.protocol import ImageSynapse
from tests._wallets import free_port, make_wallet, offline_ip  # noqa: F401 (offline_ip is a fixture)

WORKERS = 4
HOTKEYS_PER_WORKER = 10
STAKES_PER_WORKER = 20
STAKE_STEP = 0.25  # exact in binary, so sums compare exactly


class FakeClock:
    """A wall clock the test moves by hand, so block numbers are exact."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def stand_in(hotkey: str, coldkey: str = "cold") -> SimpleNamespace:
    """A wallet stand-in: all LocalChain reads from a wallet are the two ss58 addresses."""
    return SimpleNamespace(
        hotkey=SimpleNamespace(ss58_address=hotkey), coldkeypub=SimpleNamespace(ss58_address=coldkey)
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def chain_path(tmp_path: Path) -> Path:
    return tmp_path / "chain" / "local.sqlite"


@pytest.fixture
def chain(chain_path: Path, clock: FakeClock):
    with LocalChain(chain_path, seconds_per_block=1.0, weights_rate_limit=10, clock=clock) as opened:
        yield opened


def validator_with_miners(chain: LocalChain, miners: int = 3) -> SimpleNamespace:
    """Register a staked validator (uid 0) and `miners` unstaked miners (uids 1..miners)."""
    chain.register_hotkey("validator", "vcold", stake=100.0)
    for index in range(miners):
        chain.register_hotkey(f"miner-{index}", "mcold")
    return stand_in("validator", "vcold")


# ---- blocks -------------------------------------------------------------------------------------------------


def test_blocks_advance_with_wall_time(chain_path: Path) -> None:
    with LocalChain(chain_path, seconds_per_block=0.05) as chain:
        first = chain.block()
        later = first
        for _ in range(200):  # bounded: at most ~10 s, normally 1-2 polls
            time.sleep(0.05)
            later = chain.block()
            if later > first:
                break
        assert later > first


def test_block_is_elapsed_time_over_block_time_and_shared_by_openers(chain_path: Path, clock: FakeClock) -> None:
    first = LocalChain(chain_path, seconds_per_block=0.05, clock=clock)
    assert first.block() == 0
    clock.now += 0.26
    assert first.block() == 5
    # A later opener asking for other parameters adopts the stored ones (same genesis, same block time).
    second = LocalChain(chain_path, seconds_per_block=12.0, weights_rate_limit=3, max_uids=8, clock=clock)
    assert second.params == first.params
    assert second.block() == 5
    clock.now += 0.05
    assert first.block() == second.block() == 6
    first.close()
    second.close()


# ---- registration -------------------------------------------------------------------------------------------


def test_register_is_idempotent_and_sync_lists_the_wallets(chain: LocalChain, tmp_path: Path) -> None:
    alice, bob = make_wallet(tmp_path / "w", "alice"), make_wallet(tmp_path / "w", "bob")
    assert chain.register(alice) == 0
    assert chain.register(bob) == 1
    assert chain.register(alice) == 0
    view = chain.sync()
    assert view.uids == [0, 1]
    assert view.hotkeys == [alice.hotkey.ss58_address, bob.hotkey.ss58_address]
    assert view.coldkeys == [alice.coldkeypub.ss58_address, bob.coldkeypub.ss58_address]
    assert view.uid_of(bob.hotkey.ss58_address) == 1
    assert view.stake == [0.0, 0.0] and view.validator_permit == [False, False]


def test_register_hotkey_at_a_uid_replaces_its_holder_and_resets_its_state(chain: LocalChain) -> None:
    validator = validator_with_miners(chain, miners=2)
    chain.serve_axon(validator, "127.0.0.1", 9000)
    assert chain.set_weights(validator, [1, 2], [1.0, 1.0], version_key=1)[0]

    assert chain.register_hotkey("newcomer", "ncold", uid=0) == 0

    view = chain.sync()
    assert view.hotkeys[0] == "newcomer" and view.coldkeys[0] == "ncold"
    assert "validator" not in view.hotkeys
    assert view.stake[0] == 0.0 and not view.validator_permit[0]
    assert view.axons[0].ip == "0.0.0.0" and view.axons[0].port == 0
    assert chain.get_weights("newcomer") == {} and chain.last_weights_block("newcomer") is None
    assert chain.get_weights("validator") == {}
    assert chain.register_hotkey("newcomer", "ncold", uid=0) == 0  # idempotent at its own uid


def test_register_hotkey_rejects_bad_uids_and_keys(chain: LocalChain) -> None:
    chain.register_hotkey("a", "c")
    with pytest.raises(ChainError, match="already registered at uid 0"):
        chain.register_hotkey("a", "c", uid=1)
    with pytest.raises(ChainError, match="next free uid"):
        chain.register_hotkey("b", "c", uid=5)
    for bad in ({"hotkey": ""}, {"hotkey": 7}, {"hotkey": "x" * 1000}, {"stake": float("nan")}, {"stake": -1.0},
                {"uid": -1}, {"uid": True}):
        arguments = {"hotkey": "b", "coldkey": "c", **bad}
        with pytest.raises(ChainError):
            chain.register_hotkey(**arguments)
    assert chain.sync().hotkeys == ["a"]


def test_full_subnet_replaces_the_lowest_stake_neuron(chain_path: Path) -> None:
    with LocalChain(chain_path, max_uids=3) as chain:
        chain.register_hotkey("rich", "c", stake=3.0)
        chain.register_hotkey("poor", "c", stake=1.0)
        chain.register_hotkey("middle", "c", stake=2.0)
        assert chain.register_hotkey("late", "c") == 1
        assert chain.sync().hotkeys == ["rich", "late", "middle"]


# ---- stake and permits --------------------------------------------------------------------------------------


def test_validator_permits_go_to_the_top_stake_neurons_with_stake(chain_path: Path) -> None:
    with LocalChain(chain_path, max_validators=2) as chain:
        for hotkey, stake in (("zero", 0.0), ("five", 5.0), ("three", 3.0), ("nine", 9.0)):
            chain.register_hotkey(hotkey, "c", stake=stake)
        assert chain.sync().validator_permit == [False, True, False, True]
        chain.add_stake("three", 10.0)
        assert chain.sync().validator_permit == [False, False, True, True]
    with LocalChain(chain_path.with_name("few.sqlite"), max_validators=64) as chain:
        chain.register_hotkey("zero", "c")
        chain.register_hotkey("some", "c", stake=0.5)
        assert chain.sync().validator_permit == [False, True]  # stake 0 never gets a permit


def test_add_stake_returns_the_new_stake_and_rejects_bad_input(chain: LocalChain) -> None:
    chain.register_hotkey("a", "c", stake=1.0)
    assert chain.add_stake("a", 2.5) == 3.5
    assert chain.add_stake("a", -0.5) == 3.0
    for hotkey, amount, reason in (("nobody", 1.0, "not registered"), ("a", float("nan"), "finite"),
                                   ("a", "lots", "number"), ("a", -10.0, "negative")):
        with pytest.raises(ChainError, match=reason):
            chain.add_stake(hotkey, amount)
    assert chain.sync().stake == [3.0]


# ---- axons --------------------------------------------------------------------------------------------------


def test_serve_axon_publishes_an_axoninfo(chain: LocalChain, tmp_path: Path) -> None:
    miner = make_wallet(tmp_path / "w", "miner")
    uid = chain.register(miner)
    chain.serve_axon(miner, "127.0.0.1", 8091)
    axon = chain.sync().axons[uid]
    assert (axon.ip, axon.port, axon.ip_type, axon.protocol) == ("127.0.0.1", 8091, 4, 4)
    assert axon.hotkey == miner.hotkey.ss58_address and axon.coldkey == miner.coldkeypub.ss58_address
    assert axon.version > 0 and axon.is_serving


async def _answer(synapse: ImageSynapse) -> ImageSynapse:
    synapse.prediction = 0.25
    return synapse


def test_a_dendrite_reaches_a_miner_through_the_synced_axoninfo(
    chain: LocalChain, tmp_path: Path, offline_ip: str
) -> None:
    """The AxonInfo that sync() returns is all a validator needs to query a miner (bittensor's own client)."""
    miner, validator = make_wallet(tmp_path / "w", "miner"), make_wallet(tmp_path / "w", "validator")
    port = free_port()
    server = bt.Axon(wallet=miner, ip=offline_ip, port=port, external_ip=offline_ip, external_port=port)
    server.attach(forward_fn=_answer).start()
    try:
        for _ in range(200):  # uvicorn starts in a thread; wait (bounded) until the port answers
            with socket.socket() as probe:
                if probe.connect_ex((offline_ip, port)) == 0:
                    break
            time.sleep(0.05)
        uid = chain.register(miner)
        chain.serve_axon(miner, offline_ip, port)
        target = chain.sync().axons[uid]
        dendrite = bt.Dendrite(wallet=validator)
        answer = dendrite.query([target], ImageSynapse(image="aGk="), deserialize=False, timeout=10.0)[0]
        assert answer.dendrite.status_code == 200 and answer.prediction == 0.25
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("hotkey", "ip", "port", "reason"),
    [
        ("nobody", "127.0.0.1", 8091, "not registered"),
        ("a", "localhost", 8091, "invalid ip"),
        ("a", "127.0.0.1", 0, "port"),
        ("a", "127.0.0.1", 70000, "port"),
        ("a", "127.0.0.1", "8091", "port"),
    ],
)
def test_serve_axon_rejects_bad_endpoints(chain: LocalChain, hotkey: str, ip: str, port: int, reason: str) -> None:
    chain.register_hotkey("a", "c")
    with pytest.raises(ChainError, match=reason):
        chain.serve_axon(stand_in(hotkey), ip, port)
    assert not chain.sync().axons[0].is_serving


# ---- weights ------------------------------------------------------------------------------------------------


def test_weights_are_l1_normalised_and_read_back(chain: LocalChain, clock: FakeClock) -> None:
    validator = validator_with_miners(chain)
    clock.now += 4.0
    ok, message = chain.set_weights(validator, [1, 2, 3], [2.0, 6.0, 0.0], version_key=1)
    assert ok, message
    assert chain.get_weights("validator") == {1: 0.25, 2: 0.75, 3: 0.0}
    assert chain.last_weights_block("validator") == 4
    assert chain.get_weights("miner-0") == {} and chain.last_weights_block("miner-0") is None


def test_weights_accept_numpy_arrays_as_validators_build_them(chain: LocalChain) -> None:
    validator = validator_with_miners(chain)
    ok, message = chain.set_weights(
        validator, np.array([1, 3], dtype=np.int64), np.array([0.5, 1.5], dtype=np.float32), np.int64(2)
    )
    assert ok, message
    assert chain.get_weights("validator") == {1: 0.25, 3: 0.75}


def test_weights_rate_limit_is_strict_like_subtensors(chain: LocalChain, clock: FakeClock) -> None:
    """Subtensor accepts weights once blocks_since_last_update > weights_rate_limit: at exactly 10 of 10 it refuses."""
    validator = validator_with_miners(chain)
    assert chain.set_weights(validator, [1], [1.0], version_key=1)[0]
    clock.now += 10.0
    assert chain.weights_rules("validator").blocks_since_update == 10
    assert chain.set_weights(validator, [2], [1.0], version_key=1) == (
        False, "rate limited: 1 blocks left (weights_rate_limit 10)")
    assert chain.get_weights("validator") == {1: 1.0}
    clock.now += 1.0
    ok, message = chain.set_weights(validator, [2, 3], [1.0, 3.0], version_key=1)
    assert ok, message
    assert chain.get_weights("validator") == {2: 0.25, 3: 0.75}
    assert chain.last_weights_block("validator") == 11


def test_weights_rules_report_what_set_weights_enforces(chain_path: Path, clock: FakeClock) -> None:
    with LocalChain(chain_path, seconds_per_block=1.0, weights_rate_limit=4, min_version_key=7, clock=clock) as chain:
        validator_with_miners(chain)
        clock.now += 3.0
        rules = chain.weights_rules("validator")
        assert (rules.block, rules.weights_version, rules.rate_limit, rules.blocks_since_update) == (3, 7, 4, None)
        assert rules.blocks_to_wait() == 0
        assert rules.version_problem(7) is None
        assert "requires weights version_key >= 7" in rules.version_problem(6) and "sends 6" in rules.version_problem(6)
        assert chain.set_weights(stand_in("validator"), [1], [1.0], 7)[0]
        set_at = clock.now
        for since, wait in [(0, 5), (4, 1), (5, 0)]:  # blocks since our last weights -> blocks still to wait
            clock.now = set_at + since
            rules = chain.weights_rules("validator")
            assert (rules.blocks_since_update, rules.blocks_to_wait()) == (since, wait)
            ok, message = chain.set_weights(stand_in("validator"), [1], [1.0], 7)
            assert ok is (wait == 0), message
        assert chain.weights_rules("stranger").blocks_since_update is None


@pytest.mark.parametrize(
    ("hotkey", "uids", "weights", "version_key", "reason"),
    [
        ("stranger", [1], [1.0], 5, "not registered"),
        ("miner-0", [1], [1.0], 5, "no validator permit"),
        ("validator", [1], [1.0], 4, "requires weights version_key >= 5"),
        ("validator", [1, 2], [1.0], 5, "differ in length"),
        ("validator", [1, 2], [1.0, float("nan")], 5, "finite"),
        ("validator", [1, 2], [1.0, float("inf")], 5, "finite"),
        ("validator", [1, 2], [1.0, -0.5], 5, "non-negative"),
        ("validator", [1, 99], [1.0, 1.0], 5, "unknown uids [99]"),
        ("validator", [-1], [1.0], 5, "non-negative"),
        ("validator", [1, 1], [1.0, 1.0], 5, "duplicate"),
        ("validator", [1.5], [1.0], 5, "integers"),
        ("validator", [1], ["heavy"], 5, "numbers"),
        ("validator", [], [], 5, "no weights"),
        ("validator", [1, 2], [0.0, 0.0], 5, "sum to zero"),
        ("validator", [1], [1.0], "5", "version_key must be an int"),
    ],
)
def test_set_weights_rejections_store_nothing(
    chain_path: Path, hotkey: str, uids: list, weights: list, version_key: int, reason: str
) -> None:
    with LocalChain(chain_path, min_version_key=5) as chain:
        validator_with_miners(chain)
        ok, message = chain.set_weights(stand_in(hotkey), uids, weights, version_key)
        assert not ok and reason in message
        assert chain.get_weights(hotkey) == {} and chain.last_weights_block(hotkey) is None
        assert chain.set_weights(stand_in("validator"), [1], [1.0], 5)[0]  # a rejection does not rate-limit


def test_set_weights_with_an_unreadable_wallet_is_a_rejection(chain: LocalChain) -> None:
    class BrokenWallet:
        @property
        def hotkey(self):
            raise OSError("hotkey file missing")

    ok, message = chain.set_weights(BrokenWallet(), [0], [1.0], 1)
    assert not ok and "hotkey file missing" in message


# ---- sharing between instances and processes ----------------------------------------------------------------


def test_a_second_instance_on_the_same_file_sees_the_first_ones_writes(chain: LocalChain, chain_path: Path) -> None:
    validator = validator_with_miners(chain, miners=1)
    with LocalChain(chain_path) as other:
        assert other.sync().hotkeys == ["validator", "miner-0"]
        other.serve_axon(stand_in("miner-0"), "127.0.0.1", 9100)
        other.add_stake("miner-0", 2.0)
    assert chain.set_weights(validator, [1], [1.0], 1)[0]
    view = chain.sync()
    assert view.axons[1].port == 9100 and view.stake == [100.0, 2.0]
    with LocalChain(chain_path) as third:
        assert third.get_weights("validator") == {1: 1.0}


def _hammer(path: str, worker: int, start: "multiprocessing.synchronize.Event") -> None:
    """One process of the concurrency test: register hotkeys and add stake, all at once with the others."""
    chain = LocalChain(path, seconds_per_block=0.05, timeout=60.0)
    start.wait(timeout=60)
    hotkeys = [f"w{worker}-hk{index}" for index in range(HOTKEYS_PER_WORKER)]
    for hotkey in hotkeys:
        chain.register_hotkey(hotkey, f"w{worker}-cold")
    for step in range(STAKES_PER_WORKER):
        chain.add_stake(hotkeys[step % HOTKEYS_PER_WORKER], STAKE_STEP)
    chain.close()


@pytest.mark.slow
def test_concurrent_writers_in_several_processes_lose_no_update(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")  # not created yet: the processes also race to create it
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_hammer, args=(path, worker, start)) for worker in range(WORKERS)]
    for process in workers:
        process.start()
    start.set()
    for process in workers:
        process.join(timeout=120)
    assert [process.exitcode for process in workers] == [0] * WORKERS

    with LocalChain(path) as chain:
        view = chain.sync()
    assert sorted(view.uids) == list(range(WORKERS * HOTKEYS_PER_WORKER))
    assert len(set(view.hotkeys)) == WORKERS * HOTKEYS_PER_WORKER
    assert sum(view.stake) == WORKERS * STAKES_PER_WORKER * STAKE_STEP
    per_hotkey = dict(zip(view.hotkeys, view.stake))
    expected = STAKES_PER_WORKER // HOTKEYS_PER_WORKER * STAKE_STEP
    assert all(per_hotkey[f"w{w}-hk{i}"] == expected for w in range(WORKERS) for i in range(HOTKEYS_PER_WORKER))


def test_threads_sharing_one_instance_lose_no_update(chain: LocalChain) -> None:
    chain.register_hotkey("a", "c")
    threads = [threading.Thread(target=lambda: [chain.add_stake("a", 1.0) for _ in range(25)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert chain.sync().stake == [100.0]


# ---- hostile files ------------------------------------------------------------------------------------------


def test_a_file_that_is_not_sqlite_is_a_chain_error(tmp_path: Path) -> None:
    for name, content in (("text.sqlite", b"hello, I am a text file\n" * 50), ("tiny.sqlite", b"SQL")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ChainError, match="not a SQLite file"):
            LocalChain(path)
        assert path.read_bytes() == content  # left untouched


def test_a_corrupt_chain_file_is_a_chain_error(chain_path: Path) -> None:
    with LocalChain(chain_path) as chain:
        for index in range(50):
            chain.register_hotkey(f"hk-{index}" * 8, "c")
    data = bytearray(chain_path.read_bytes())
    data[100:] = bytes((7 * i) % 251 for i in range(len(data) - 100))  # keep the header, garble every page
    chain_path.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        chain_path.with_name(chain_path.name + suffix).unlink(missing_ok=True)
    with pytest.raises(ChainError):
        with LocalChain(chain_path) as chain:
            chain.sync()


def test_another_applications_sqlite_file_is_a_chain_error(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    with pytest.raises(ChainError, match="something else"):
        LocalChain(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("invoices",)]


def test_a_file_of_another_netuid_or_schema_is_a_chain_error(chain_path: Path) -> None:
    LocalChain(chain_path, netuid=34).close()
    with pytest.raises(ChainError, match="holds netuid 34"):
        LocalChain(chain_path, netuid=7)
    with sqlite3.connect(chain_path) as conn:
        conn.execute("UPDATE meta SET value = 'nonsense' WHERE key = 'seconds_per_block'")
    with pytest.raises(ChainError, match="corrupt LocalChain parameters"):
        LocalChain(chain_path)
    with sqlite3.connect(chain_path) as conn:
        conn.execute("UPDATE meta SET value = 'someone-else-2' WHERE key = 'schema'")
    with pytest.raises(ChainError, match="schema"):
        LocalChain(chain_path)


@pytest.mark.parametrize(
    "arguments",
    [{"seconds_per_block": 0}, {"seconds_per_block": float("nan")}, {"max_uids": 0}, {"max_validators": 0},
     {"weights_rate_limit": -1}, {"timeout": 0}, {"netuid": "34"}, {"max_uids": 2.5}],
)
def test_bad_parameters_are_a_chain_error(chain_path: Path, arguments: dict) -> None:
    with pytest.raises(ChainError):
        LocalChain(chain_path, **arguments)


def test_a_directory_path_is_a_chain_error(tmp_path: Path) -> None:
    with pytest.raises(ChainError, match="directory"):
        LocalChain(tmp_path)


# ---- make_chain ---------------------------------------------------------------------------------------------


def test_make_chain_builds_a_local_chain_from_the_command_line(tmp_path: Path) -> None:
    parser = new_parser("test")
    add_chain_args(parser)
    path = tmp_path / "cli.sqlite"
    config = build_config(
        parser, ["--chain", "local", "--chain.path", str(path), "--chain.seconds_per_block", "0.5", "--netuid", "9"]
    )
    with make_chain(config) as chain:
        assert isinstance(chain, LocalChain) and isinstance(chain, Chain)
        assert chain.netuid == 9 and chain.params.seconds_per_block == 0.5
        assert chain.sync().netuid == 9
    assert path.exists()
    assert math.isclose(LocalChain(path, netuid=9).params.seconds_per_block, 0.5)



def test_opening_waits_for_another_process_that_holds_the_new_file(tmp_path: Path) -> None:
    """Switching a new file to WAL fails at once ("database is locked") while another opener holds it, whatever
    the busy timeout; LocalChain must wait for it instead of failing."""
    path = tmp_path / "busy.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # what a concurrent creator holds while it creates the tables
    outcome: list = []

    def open_chain() -> None:
        try:
            with LocalChain(path, timeout=30.0) as chain:
                outcome.append(chain.register_hotkey("late", "c"))
        except Exception as error:  # asserted below
            outcome.append(error)

    opener = threading.Thread(target=open_chain)
    opener.start()
    opener.join(timeout=0.3)
    holder.execute("ROLLBACK")
    holder.close()
    opener.join(timeout=30)
    assert outcome == [0]
