"""BittensorChain over a fake subtensor: field mapping, weight processing, rejections, refusals, timeouts, errors.

The fake stands in for `bt.Subtensor` method by method, and each of its methods takes exactly the real method's
parameters (bound against `inspect.signature` of the real one), so a call the real subtensor would refuse fails here
too. tests/test_chain_extrinsics.py runs the same chain calls through the real `bt.Subtensor` code instead.
"""

import functools
import inspect
import threading
from types import SimpleNamespace
from typing import Any

import bittensor as bt
import numpy as np
import pytest
from bittensor.core.types import ExtrinsicResponse

import bitmind.chain.bittensor_chain as bittensor_chain
from bitmind.chain import BittensorChain, ChainError, make_chain
from bitmind.config import add_chain_args, build_config, new_parser

NETUID = 34
PUBLIC_IP = "93.184.216.34"
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


def like_subtensor(method: Any) -> Any:
    """Make a fake method take exactly the parameters of the `bt.Subtensor` method of the same name: arguments are
    bound against the real signature (TypeError for a keyword the real one does not take) and handed to the fake
    as keywords, defaults filled in."""
    real = inspect.signature(getattr(bt.Subtensor, method.__name__))

    @functools.wraps(method)
    def strict(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = real.bind(self, *args, **kwargs)
        bound.apply_defaults()
        return method(self, **{name: value for name, value in bound.arguments.items() if name != "self"})

    strict.real_signature = real
    return strict


class FakeSubtensor:
    """The `bt.Subtensor` methods BittensorChain calls. `hang` makes a method block until `release` is set,
    `fail` makes it raise; `calls` records every call with all its arguments (defaults included)."""

    def __init__(self, hang: str | None = None, fail: str | None = None) -> None:
        self.hang, self.fail = hang, fail
        self.release = threading.Event()
        self.entered = threading.Event()
        self.finished: set[str] = set()
        self.calls: list[tuple[str, dict]] = []
        self.set_weights_result: Any = ExtrinsicResponse(True, "Successfully set weights.")
        self.serve_axon_result: Any = ExtrinsicResponse(True, "served")
        self.register_result: Any = ExtrinsicResponse(True, "registered")
        self.uids = {"hk-a": 0}
        self.hyperparameters = {"WeightsVersionKey": 2020, "WeightsSetRateLimit": 100, "SubnetworkN": 3}
        self.last_update = {0: 4300}
        self.closed = False

    def _enter(self, name: str, arguments: dict) -> None:
        self.calls.append((name, arguments))
        self.entered.set()
        if name == self.fail:
            raise ConnectionError(f"{name} lost the websocket")
        if name == self.hang:
            self.release.wait(HANG_LIMIT_S)
            self.finished.add(name)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    @like_subtensor
    def get_current_block(self) -> int:
        self._enter("get_current_block", {})
        return 4321

    @like_subtensor
    def metagraph(self, **arguments: Any) -> FakeMetagraph:
        self._enter("metagraph", arguments)
        return FakeMetagraph()

    @like_subtensor
    def subnetwork_n(self, **arguments: Any) -> int | None:
        self._enter("subnetwork_n", arguments)
        return self.hyperparameters.get("SubnetworkN")

    @like_subtensor
    def min_allowed_weights(self, **arguments: Any) -> int:
        self._enter("min_allowed_weights", arguments)
        return 1

    @like_subtensor
    def max_weight_limit(self, **arguments: Any) -> float:
        self._enter("max_weight_limit", arguments)
        return 0.6

    @like_subtensor
    def get_hyperparameter(self, **arguments: Any) -> Any:
        self._enter("get_hyperparameter", arguments)
        return self.hyperparameters.get(arguments["param_name"])

    @like_subtensor
    def weights_rate_limit(self, **arguments: Any) -> int | None:
        self._enter("weights_rate_limit", arguments)
        return self.hyperparameters.get("WeightsSetRateLimit")

    @like_subtensor
    def blocks_since_last_update(self, **arguments: Any) -> int:
        self._enter("blocks_since_last_update", arguments)
        return arguments["block"] - self.last_update[arguments["uid"]]

    @like_subtensor
    def set_weights(self, **arguments: Any) -> Any:
        self._enter("set_weights", arguments)
        return self.set_weights_result

    @like_subtensor
    def serve_axon(self, **arguments: Any) -> Any:
        self._enter("serve_axon", arguments)
        return self.serve_axon_result

    @like_subtensor
    def get_uid_for_hotkey_on_subnet(self, **arguments: Any) -> int | None:
        self._enter("get_uid_for_hotkey_on_subnet", arguments)
        return self.uids.get(arguments["hotkey_ss58"])

    @like_subtensor
    def burned_register(self, **arguments: Any) -> Any:
        self._enter("burned_register", arguments)
        if self.register_result[0]:
            self.uids[arguments["wallet"].hotkey.ss58_address] = len(self.uids)
        return self.register_result

    @like_subtensor
    def close(self) -> None:
        self.closed = True


def stand_in(hotkey: str) -> SimpleNamespace:
    return SimpleNamespace(hotkey=SimpleNamespace(ss58_address=hotkey), coldkeypub=SimpleNamespace(ss58_address="c"))


def config(timeout: float = 5.0, extra: list[str] = ()) -> bt.Config:
    parser = new_parser("test")
    add_chain_args(parser)
    return build_config(parser, ["--netuid", str(NETUID), "--chain.timeout", str(timeout), *extra])


def wait_until(predicate: Any, limit: float = HANG_LIMIT_S) -> bool:
    done = threading.Event()
    for _ in range(int(limit / 0.01)):
        if predicate():
            return True
        done.wait(0.01)
    return bool(predicate())


@pytest.fixture
def fake() -> FakeSubtensor:
    subtensor = FakeSubtensor()
    yield subtensor
    subtensor.release.set()


# ---- the fake itself ---------------------------------------------------------------------------------------


def test_every_fake_method_takes_exactly_the_real_subtensors_parameters(fake: FakeSubtensor) -> None:
    public = [name for name in vars(FakeSubtensor) if not name.startswith("_") and callable(vars(FakeSubtensor)[name])]
    assert set(public) - {"names"} == {
        "get_current_block", "metagraph", "subnetwork_n", "min_allowed_weights", "max_weight_limit",
        "get_hyperparameter",
        "weights_rate_limit", "blocks_since_last_update", "set_weights", "serve_axon",
        "get_uid_for_hotkey_on_subnet", "burned_register", "close",
    }
    for name in set(public) - {"names"}:
        assert getattr(FakeSubtensor, name).real_signature == inspect.signature(getattr(bt.Subtensor, name)), name
    with pytest.raises(TypeError, match="unexpected keyword argument 'wait_for_inclusion'"):
        fake.get_current_block(wait_for_inclusion=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_retries'"):
        fake.set_weights(wallet=None, netuid=1, uids=[0], weights=[1.0], max_retries=1)
    assert fake.calls == []


# ---- reads --------------------------------------------------------------------------------------------------


def test_sync_maps_the_metagraph_into_a_view(fake: FakeSubtensor) -> None:
    view = BittensorChain(config(), subtensor=fake).sync()
    assert fake.calls == [("metagraph", {"netuid": NETUID, "mechid": 0, "lite": True, "block": None})]
    assert view.netuid == NETUID and view.block == 4321
    assert view.uids == [0, 1, 2] and all(type(uid) is int for uid in view.uids)
    assert view.hotkeys == ["hk-a", "hk-b", "hk-c"] and view.coldkeys == ["hk-a-cold", "hk-b-cold", "hk-c-cold"]
    assert view.stake == [10.5, 0.0, 2.25] and all(type(stake) is float for stake in view.stake)
    assert view.validator_permit == [True, False, True] and all(type(p) is bool for p in view.validator_permit)
    assert [(info.hotkey, info.port) for info in view.axons] == [("hk-a", 8091), ("hk-b", 8092), ("hk-c", 8093)]
    assert view.uid_of("hk-c") == 2


def test_block_reads_the_current_block(fake: FakeSubtensor) -> None:
    assert BittensorChain(config(), subtensor=fake).block() == 4321


def test_weights_rules_read_version_rate_limit_and_our_last_update_at_one_block(fake: FakeSubtensor) -> None:
    rules = BittensorChain(config(), subtensor=fake).weights_rules("hk-a")
    assert (rules.block, rules.weights_version, rules.rate_limit, rules.blocks_since_update) == (4321, 2020, 100, 21)
    assert rules.blocks_to_wait() == 80
    blocks = [arguments["block"] for name, arguments in fake.calls if name != "get_current_block"]
    assert blocks == [4321] * len(blocks) and len(blocks) == 4
    assert BittensorChain(config(), subtensor=fake).weights_rules("hk-unregistered").blocks_since_update is None


def test_reads_of_a_missing_subnet_are_chain_errors(fake: FakeSubtensor) -> None:
    fake.hyperparameters = {}  # what bittensor answers for a netuid that does not exist
    chain = BittensorChain(config(), subtensor=fake)
    with pytest.raises(ChainError, match=f"netuid {NETUID} does not exist"):
        chain.weights_rules("hk-a")
    with pytest.raises(ChainError, match=f"netuid {NETUID} does not exist"):
        chain.set_weights(stand_in("hk-a"), [0], [1.0], 1)
    assert "set_weights" not in fake.names()


# ---- weights ------------------------------------------------------------------------------------------------


def test_set_weights_passes_version_key_and_the_subnet_processed_weights_in_one_attempt(fake: FakeSubtensor) -> None:
    chain = BittensorChain(config(), subtensor=fake)
    ok, message = chain.set_weights(stand_in("hk-a"), [0, 1, 2], [3.0, 1.0, 0.0], version_key=2002)
    assert (ok, message) == (True, "Successfully set weights.")
    sent = dict(fake.calls)["set_weights"]
    assert sent["netuid"] == NETUID and sent["version_key"] == 2002 and sent["wallet"].hotkey.ss58_address == "hk-a"
    assert sent["max_attempts"] == 1  # bittensor's default of 5 would send up to 5 extrinsics per try
    assert (sent["wait_for_inclusion"], sent["wait_for_finalization"]) == (True, False)
    # max_weight_limit 0.6 caps the 0.75 share the raw weights would give uid 0; the zero weight is dropped.
    assert list(sent["uids"]) == [0, 1]
    assert np.isclose(float(np.sum(sent["weights"])), 1.0)
    assert float(np.max(sent["weights"])) <= 0.6 + 1e-6 and float(sent["weights"][0]) > float(sent["weights"][1])
    assert fake.names() == ["subnetwork_n", "min_allowed_weights", "max_weight_limit", "set_weights"]  # no metagraph


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
    burned = dict(fake.calls)["burned_register"]
    assert burned["netuid"] == NETUID and (burned["wait_for_inclusion"], burned["wait_for_finalization"]) == (
        True, False)
    fake.register_result = ExtrinsicResponse(False, "Balance too low")
    with pytest.raises(ChainError, match="burned_register of hk-poor on netuid 34 rejected: Balance too low"):
        chain.register(stand_in("hk-poor"))


def test_serve_axon_hands_the_wallet_ip_and_port_to_subtensor(fake: FakeSubtensor) -> None:
    wallet = stand_in("hk-a")
    chain = BittensorChain(config(), subtensor=fake)
    chain.serve_axon(wallet, PUBLIC_IP, 8091)
    served = dict(fake.calls)["serve_axon"]
    assert served["netuid"] == NETUID
    assert (served["axon"].wallet, served["axon"].external_ip, served["axon"].external_port) == (
        wallet, PUBLIC_IP, 8091)
    assert (served["wait_for_inclusion"], served["wait_for_finalization"]) == (True, False)
    fake.serve_axon_result = ExtrinsicResponse(False, "ServingRateLimitExceeded")
    with pytest.raises(ChainError, match="ServingRateLimitExceeded"):
        chain.serve_axon(wallet, PUBLIC_IP, 8091)
    with pytest.raises(ChainError, match="invalid ip"):
        chain.serve_axon(wallet, "not-an-ip", 8091)
    assert fake.names().count("serve_axon") == 2


@pytest.mark.parametrize(
    ("ip", "kind"),
    [("127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"), ("10.1.2.3", "private"), ("192.168.0.7", "private"),
     ("::1", "loopback"), ("::", "unspecified"), ("fd00::5", "private"), ("100.64.0.1", "non-public")],
)
def test_serve_axon_refuses_an_address_validators_cannot_reach(fake: FakeSubtensor, ip: str, kind: str) -> None:
    with pytest.raises(ChainError) as refused:
        BittensorChain(config(), subtensor=fake).serve_axon(stand_in("hk-a"), ip, 8091)
    message = str(refused.value)
    assert f"{ip} is a" in message and kind in message
    assert "--axon.external_ip" in message and "AXON_EXTERNAL_IP" in message
    assert fake.calls == []


@pytest.mark.parametrize("argv", [["--subtensor.network", "local"], ["--subtensor.network", "ws://10.0.0.9:9944"]])
def test_a_local_dev_chain_accepts_loopback_and_private_axons(fake: FakeSubtensor, argv: list[str]) -> None:
    chain = BittensorChain(config(extra=argv), subtensor=fake)
    chain.serve_axon(stand_in("hk-a"), "127.0.0.1", 8091)
    chain.serve_axon(stand_in("hk-a"), "10.0.0.7", 8091)
    assert fake.names() == ["serve_axon", "serve_axon"]


# ---- timeouts and failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hang", "name", "call"),
    [
        ("get_current_block", "get_current_block", lambda chain: chain.block()),
        ("metagraph", "metagraph", lambda chain: chain.sync()),
        ("set_weights", "set_weights", lambda chain: chain.set_weights(stand_in("hk-a"), [0], [1.0], 1)),
        ("serve_axon", "serve_axon", lambda chain: chain.serve_axon(stand_in("hk-a"), PUBLIC_IP, 8091)),
        ("burned_register", "register", lambda chain: chain.register(stand_in("hk-new"))),
        ("get_hyperparameter", "weights_rules", lambda chain: chain.weights_rules("hk-a")),
    ],
)
def test_a_hung_call_raises_chain_error_while_it_still_hangs(hang: str, name: str, call: Any) -> None:
    fake = FakeSubtensor(hang=hang)
    chain = BittensorChain(config(timeout=0.2), subtensor=fake)
    try:
        with pytest.raises(ChainError, match=f"^{name} timed out after 0.2s$"):
            call(chain)
        assert hang in fake.names() and hang not in fake.finished  # the caller got control back first
        # A later call is not queued behind the hung one: it returns while that one still hangs. (A timeout far
        # above the hang's own limit, so a slow machine cannot fail the later call, and a queued call would only
        # return once the hung one had finished.)
        chain.timeout = 3 * HANG_LIMIT_S
        later = chain.sync().block if hang == "get_current_block" else chain.block()
        assert later == 4321 and hang not in fake.finished
        assert not fake.closed  # a connection we were handed is never closed by us
    finally:
        fake.release.set()


def test_an_exception_in_a_call_becomes_a_chain_error_naming_it() -> None:
    fake = FakeSubtensor(fail="metagraph")
    with pytest.raises(ChainError, match="metagraph failed: ConnectionError: metagraph lost the websocket") as info:
        BittensorChain(config(), subtensor=fake).sync()
    assert isinstance(info.value.__cause__, ConnectionError)


class SlowBlocks(FakeSubtensor):
    """get_current_block calls that each take until the test releases them, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.releases = [threading.Event(), threading.Event()]
        self.started: list[threading.Event] = []

    @like_subtensor
    def get_current_block(self) -> int:
        release = self.releases[len(self.started)]
        self.started.append(release)
        release.wait(HANG_LIMIT_S)
        return 4321


def test_time_queued_behind_another_call_does_not_count_against_the_timeout() -> None:
    """Two 1.5 s calls on one connection: the second returns 3 s after it was made, past the 2.8 s timeout, yet
    succeeds, because its clock starts once it holds the connection (each call has 1.3 s to spare)."""
    fake = SlowBlocks()
    chain = BittensorChain(config(timeout=2.8), subtensor=fake)
    answers: list[Any] = []

    def ask() -> None:
        try:
            answers.append(chain.block())
        except ChainError as error:
            answers.append(error)

    first, second = threading.Thread(target=ask), threading.Thread(target=ask)
    try:
        first.start()
        assert wait_until(lambda: len(fake.started) == 1)
        second.start()  # queued behind the first
        for index in range(2):
            threading.Event().wait(1.5)
            fake.releases[index].set()
            if index == 0:
                assert wait_until(lambda: len(fake.started) == 2)
        first.join(HANG_LIMIT_S)
        second.join(HANG_LIMIT_S)
        assert answers == [4321, 4321]
    finally:
        for release in fake.releases:
            release.set()


class OwnedSubtensors:
    """Stands in for the `bt.Subtensor` class, so BittensorChain makes (and owns) its connections."""

    def __init__(self, hang_first: str | None = None) -> None:
        self.hang_first = hang_first
        self.made: list[FakeSubtensor] = []

    def __call__(self, config: bt.Config) -> FakeSubtensor:
        self.made.append(FakeSubtensor(hang=self.hang_first if not self.made else None))
        return self.made[-1]

    def release_all(self) -> None:
        for subtensor in self.made:
            subtensor.release.set()


def test_an_abandoned_connection_is_closed_only_after_its_call_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = config(timeout=0.2)
    connections = OwnedSubtensors(hang_first="get_current_block")
    monkeypatch.setattr(bittensor_chain.bt, "Subtensor", connections)
    chain = BittensorChain(settings)
    assert connections.made == []  # constructing does not connect
    try:
        with pytest.raises(ChainError, match="get_current_block timed out"):
            chain.block()
        stale = connections.made[0]
        chain.timeout = 3 * HANG_LIMIT_S  # the next call must not fail only because this machine is slow
        assert chain.block() == 4321  # a fresh connection
        assert len(connections.made) == 2
        assert not stale.closed  # its call still runs on it: closing now would pull the socket from under it
        assert stale.names() == ["get_current_block"]  # and no later call was sent on it
        stale.release.set()
        assert wait_until(lambda: stale.closed)
        assert not connections.made[1].closed
        chain.close()
        assert connections.made[1].closed
    finally:
        connections.release_all()


def test_close_waits_for_the_call_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = config(timeout=HANG_LIMIT_S)
    connections = OwnedSubtensors(hang_first="metagraph")
    monkeypatch.setattr(bittensor_chain.bt, "Subtensor", connections)
    chain = BittensorChain(settings)
    syncing = threading.Thread(target=chain.sync)
    syncing.start()
    try:
        assert wait_until(lambda: connections.made and connections.made[0].entered.is_set())
        chain.close()
        assert not connections.made[0].closed
        connections.made[0].release.set()
        syncing.join(HANG_LIMIT_S)
        assert connections.made[0].closed
    finally:
        connections.release_all()


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
