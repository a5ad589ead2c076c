"""BittensorChain over a fake subtensor: field mapping, weight processing, rejections, timeouts, errors."""

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bittensor as bt
import numpy as np
import pytest
from bittensor.core.types import ExtrinsicResponse
from bittensor.utils import networking

import bitmind.chain.bittensor_chain as bittensor_chain
from bitmind.chain import BittensorChain, ChainError, make_chain
from bitmind.config import add_chain_args, build_config, new_parser
from tests._wallets import make_wallet

NETUID = 34
HANG_LIMIT_S = 10.0  # a hung fake call gives up by itself after this, so no test leaves a thread behind for long


def axon(hotkey: str, port: int) -> bt.AxonInfo:
    return bt.AxonInfo(version=1, ip="127.0.0.1", port=port, ip_type=4, hotkey=hotkey, coldkey=f"{hotkey}-cold")


class FakeMetagraph:
    """The attributes BittensorChain reads from a `bt.Metagraph`, typed as 10.5 types them (numpy arrays)."""

    def __init__(self) -> None:
        self.axons = [axon("hk-a", 8091), axon("hk-b", 8092), axon("hk-c", 8093)]
        self.uids = np.array([0, 1, 2], dtype=np.int64)
        self.S = np.array([10.5, 0.0, 2.25], dtype=np.float32)
        self.validator_permit = np.array([True, False, True])
        self.block = np.array(4321, dtype=np.int64)
        self.n = np.array(3, dtype=np.int64)

    @property
    def hotkeys(self) -> list[str]:
        return [info.hotkey for info in self.axons]

    @property
    def coldkeys(self) -> list[str]:
        return [info.coldkey for info in self.axons]


class FakeSubtensor:
    """The `bt.Subtensor` methods BittensorChain calls. `hang` makes a method block until `release` is set,
    `fail` makes it raise; `calls` records every call with its arguments."""

    def __init__(self, hang: str | None = None, fail: str | None = None) -> None:
        self.hang, self.fail = hang, fail
        self.release = threading.Event()
        self.finished: set[str] = set()
        self.calls: list[tuple[str, dict]] = []
        self.set_weights_result: Any = ExtrinsicResponse(True, "Successfully set weights.")
        self.serve_axon_result: Any = ExtrinsicResponse(True, "served")
        self.register_result: Any = ExtrinsicResponse(True, "registered")
        self.uids = {"hk-a": 0}
        self.closed = False

    def _enter(self, name: str, **arguments: Any) -> None:
        self.calls.append((name, arguments))
        if name == self.fail:
            raise ConnectionError(f"{name} lost the websocket")
        if name == self.hang:
            self.release.wait(HANG_LIMIT_S)
            self.finished.add(name)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def get_current_block(self) -> int:
        self._enter("get_current_block")
        return 4321

    def metagraph(self, netuid: int) -> FakeMetagraph:
        self._enter("metagraph", netuid=netuid)
        return FakeMetagraph()

    def min_allowed_weights(self, netuid: int) -> int:
        self._enter("min_allowed_weights", netuid=netuid)
        return 1

    def max_weight_limit(self, netuid: int) -> float:
        self._enter("max_weight_limit", netuid=netuid)
        return 0.6

    def set_weights(self, **arguments: Any) -> Any:
        self._enter("set_weights", **arguments)
        return self.set_weights_result

    def serve_axon(self, netuid: int, axon: Any) -> Any:
        self._enter("serve_axon", netuid=netuid, axon=axon)
        return self.serve_axon_result

    def get_uid_for_hotkey_on_subnet(self, hotkey_ss58: str, netuid: int) -> int | None:
        self._enter("get_uid_for_hotkey_on_subnet", hotkey_ss58=hotkey_ss58, netuid=netuid)
        return self.uids.get(hotkey_ss58)

    def burned_register(self, wallet: Any, netuid: int, **arguments: Any) -> Any:
        self._enter("burned_register", wallet=wallet, netuid=netuid, **arguments)
        if self.register_result[0]:
            self.uids[wallet.hotkey.ss58_address] = len(self.uids)
        return self.register_result

    def close(self) -> None:
        self.closed = True


def stand_in(hotkey: str) -> SimpleNamespace:
    return SimpleNamespace(hotkey=SimpleNamespace(ss58_address=hotkey), coldkeypub=SimpleNamespace(ss58_address="c"))


def config(timeout: float = 5.0) -> bt.Config:
    parser = new_parser("test")
    add_chain_args(parser)
    return build_config(parser, ["--netuid", str(NETUID), "--chain.timeout", str(timeout)])


@pytest.fixture
def fake() -> FakeSubtensor:
    subtensor = FakeSubtensor()
    yield subtensor
    subtensor.release.set()


# ---- reads --------------------------------------------------------------------------------------------------


def test_sync_maps_the_metagraph_into_a_view(fake: FakeSubtensor) -> None:
    view = BittensorChain(config(), subtensor=fake).sync()
    assert fake.calls == [("metagraph", {"netuid": NETUID})]
    assert view.netuid == NETUID and view.block == 4321
    assert view.uids == [0, 1, 2] and all(type(uid) is int for uid in view.uids)
    assert view.hotkeys == ["hk-a", "hk-b", "hk-c"] and view.coldkeys == ["hk-a-cold", "hk-b-cold", "hk-c-cold"]
    assert view.stake == [10.5, 0.0, 2.25] and all(type(stake) is float for stake in view.stake)
    assert view.validator_permit == [True, False, True] and all(type(p) is bool for p in view.validator_permit)
    assert [(info.hotkey, info.port) for info in view.axons] == [("hk-a", 8091), ("hk-b", 8092), ("hk-c", 8093)]
    assert view.uid_of("hk-c") == 2


def test_block_reads_the_current_block(fake: FakeSubtensor) -> None:
    assert BittensorChain(config(), subtensor=fake).block() == 4321


# ---- weights ------------------------------------------------------------------------------------------------


def test_set_weights_passes_version_key_and_the_subnet_processed_weights(fake: FakeSubtensor) -> None:
    chain = BittensorChain(config(), subtensor=fake)
    chain.sync()
    ok, message = chain.set_weights(stand_in("hk-a"), [0, 1, 2], [3.0, 1.0, 0.0], version_key=2002)
    assert (ok, message) == (True, "Successfully set weights.")
    sent = dict(fake.calls)["set_weights"]
    assert sent["netuid"] == NETUID and sent["version_key"] == 2002 and sent["wallet"].hotkey.ss58_address == "hk-a"
    # max_weight_limit 0.6 caps the 0.75 share the raw weights would give uid 0; the zero weight is dropped.
    assert list(sent["uids"]) == [0, 1]
    assert np.isclose(float(np.sum(sent["weights"])), 1.0)
    assert float(np.max(sent["weights"])) <= 0.6 + 1e-6 and float(sent["weights"][0]) > float(sent["weights"][1])
    assert "min_allowed_weights" in fake.names() and "max_weight_limit" in fake.names()
    assert fake.names().count("metagraph") == 1  # the synced metagraph is reused


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (ExtrinsicResponse(False, None), (False, "rate limited or rejected")),
        ((False, None), (False, "rate limited or rejected")),
        (ExtrinsicResponse(False, "Hotkey hk-z not registered."), (False, "Hotkey hk-z not registered.")),
        ((True, None), (True, "weights set")),
    ],
)
def test_set_weights_unpacks_the_chains_answer_without_raising(
    fake: FakeSubtensor, result: Any, expected: tuple[bool, str]
) -> None:
    fake.set_weights_result = result
    assert BittensorChain(config(), subtensor=fake).set_weights(stand_in("hk-a"), [0], [1.0], 1) == expected


@pytest.mark.parametrize(
    ("uids", "weights", "reason"),
    [([0, 1], [1.0], "differ in length"), ([0], [float("nan")], "finite"), ([0], [-1.0], "non-negative"),
     ([], [], "no weights")],
)
def test_invalid_weights_are_rejected_before_reaching_the_chain(
    fake: FakeSubtensor, uids: list, weights: list, reason: str
) -> None:
    ok, message = BittensorChain(config(), subtensor=fake).set_weights(stand_in("hk-a"), uids, weights, 1)
    assert not ok and reason in message
    assert fake.calls == []


# ---- registration and serving -------------------------------------------------------------------------------


def test_register_returns_the_existing_uid_without_burning(fake: FakeSubtensor) -> None:
    assert BittensorChain(config(), subtensor=fake).register(stand_in("hk-a")) == 0
    assert "burned_register" not in fake.names()


def test_register_burns_for_a_new_hotkey_and_reports_a_refusal(fake: FakeSubtensor) -> None:
    chain = BittensorChain(config(), subtensor=fake)
    assert chain.register(stand_in("hk-new")) == 1
    assert dict(fake.calls)["burned_register"]["netuid"] == NETUID
    fake.register_result = ExtrinsicResponse(False, "Balance too low")
    with pytest.raises(ChainError, match="Balance too low"):
        chain.register(stand_in("hk-poor"))


def test_serve_axon_hands_the_wallet_ip_and_port_to_subtensor(fake: FakeSubtensor) -> None:
    wallet = stand_in("hk-a")
    chain = BittensorChain(config(), subtensor=fake)
    chain.serve_axon(wallet, "203.0.113.7", 8091)
    served = dict(fake.calls)["serve_axon"]
    assert served["netuid"] == NETUID
    assert (served["axon"].wallet, served["axon"].external_ip, served["axon"].external_port) == (
        wallet, "203.0.113.7", 8091)
    fake.serve_axon_result = ExtrinsicResponse(False, "ServingRateLimitExceeded")
    with pytest.raises(ChainError, match="ServingRateLimitExceeded"):
        chain.serve_axon(wallet, "203.0.113.7", 8091)
    with pytest.raises(ChainError, match="invalid ip"):
        chain.serve_axon(wallet, "not-an-ip", 8091)
    assert fake.names().count("serve_axon") == 2


class ExtrinsicLevelFake:
    """Just enough subtensor for bittensor 10.5's own `Subtensor.serve_axon` code path to compose its call."""

    network = "fake"

    def __init__(self) -> None:
        self.composed: dict = {}

    def get_neuron_for_pubkey_and_subnet(self, hotkey_ss58: str, netuid: int) -> SimpleNamespace:
        return SimpleNamespace(is_null=True)

    def compose_call(self, call_module: str, call_function: str, call_params: dict) -> dict:
        self.composed = {"module": call_module, "function": call_function, **call_params}
        return self.composed

    def sign_and_send_extrinsic(self, **arguments: Any) -> ExtrinsicResponse:
        return ExtrinsicResponse(True, "included")

    def serve_axon(self, netuid: int, axon: Any) -> ExtrinsicResponse:
        return bt.Subtensor.serve_axon(self, netuid=netuid, axon=axon)


def test_the_served_endpoint_satisfies_bittensors_serve_axon_extrinsic(tmp_path: Path) -> None:
    wallet = make_wallet(tmp_path / "wallets", "miner")
    fake = ExtrinsicLevelFake()
    BittensorChain(config(), subtensor=fake).serve_axon(wallet, "203.0.113.7", 8091)
    assert fake.composed["function"] == "serve_axon"
    assert fake.composed["ip"] == networking.ip_to_int("203.0.113.7") and fake.composed["port"] == 8091
    assert fake.composed["netuid"] == NETUID and fake.composed["protocol"] == 4


# ---- timeouts and failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hang", "name", "call"),
    [
        ("get_current_block", "get_current_block", lambda chain: chain.block()),
        ("metagraph", "metagraph", lambda chain: chain.sync()),
        ("set_weights", "set_weights", lambda chain: chain.set_weights(stand_in("hk-a"), [0], [1.0], 1)),
        ("serve_axon", "serve_axon", lambda chain: chain.serve_axon(stand_in("hk-a"), "127.0.0.1", 8091)),
        ("burned_register", "register", lambda chain: chain.register(stand_in("hk-new"))),
    ],
)
def test_a_hung_call_raises_chain_error_while_it_still_hangs(hang: str, name: str, call: Any) -> None:
    fake = FakeSubtensor(hang=hang)
    chain = BittensorChain(config(timeout=0.2), subtensor=fake)
    try:
        with pytest.raises(ChainError, match=f"^{name} timed out after 0.2s$"):
            call(chain)
        assert hang in fake.names() and hang not in fake.finished  # the caller got control back first
        # A later call is not queued behind the hung one.
        later = chain.sync().block if hang == "get_current_block" else chain.block()
        assert later == 4321
    finally:
        fake.release.set()


def test_an_exception_in_a_call_becomes_a_chain_error_naming_it() -> None:
    fake = FakeSubtensor(fail="metagraph")
    with pytest.raises(ChainError, match="metagraph failed: ConnectionError: metagraph lost the websocket") as info:
        BittensorChain(config(), subtensor=fake).sync()
    assert isinstance(info.value.__cause__, ConnectionError)


def test_an_owned_connection_is_replaced_after_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[FakeSubtensor] = []

    def connect(config: bt.Config) -> FakeSubtensor:
        made.append(FakeSubtensor(hang="get_current_block" if not made else None))
        return made[-1]

    settings = config(timeout=0.2)
    monkeypatch.setattr(bittensor_chain.bt, "Subtensor", connect)
    chain = BittensorChain(settings)
    assert made == []  # constructing does not connect
    try:
        with pytest.raises(ChainError, match="get_current_block timed out"):
            chain.block()
        assert chain.block() == 4321
        assert len(made) == 2
        for _ in range(100):  # the stale connection is closed in the background; bounded wait
            if made[0].closed:
                break
            made[0].release.wait(0.02)
        assert made[0].closed and not made[1].closed
        chain.close()
        assert made[1].closed
    finally:
        for subtensor in made:
            subtensor.release.set()


# ---- make_chain ---------------------------------------------------------------------------------------------


def test_make_chain_picks_bittensor_by_default_without_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = config(timeout=7.5)
    monkeypatch.setattr(bittensor_chain.bt, "Subtensor", lambda config: pytest.fail("connected eagerly"))
    chain = make_chain(settings)
    assert isinstance(chain, BittensorChain)
    assert chain.timeout == 7.5 and chain.netuid == NETUID


def test_make_chain_rejects_an_unknown_backend() -> None:
    bad = config()
    bad.chain.backend = "ethereum"
    with pytest.raises(ChainError, match="unknown chain backend 'ethereum'"):
        make_chain(bad)


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), "soon"])
def test_a_nonsensical_timeout_is_a_chain_error(fake: FakeSubtensor, timeout: Any) -> None:
    with pytest.raises(ChainError, match="timeout"):
        BittensorChain(config(), subtensor=fake, timeout=timeout)
