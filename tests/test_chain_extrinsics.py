"""BittensorChain through bittensor 10.5's real code: `bt.Subtensor` is built and run as in production, down to its
substrate connection, which is a stand-in here (`FakeSubstrate`, a one-subnet chain).

So `set_weights`, `serve_axon`, `register` and `weights_rules` run bittensor's own weight processing, rate-limit
check, call composition (validated against call metadata) and signing, and the tests assert the extrinsics that
would reach the chain: module, function, parameters, signer, and how many. Each stand-in method takes exactly the
parameters of the `SubstrateInterface` method it replaces (bound against its `inspect.signature`).
"""

import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bittensor as bt
import bittensor.core.subtensor as subtensor_module
import numpy as np
import pytest
from async_substrate_interface.sync_substrate import SubstrateInterface
from bittensor.core.settings import version_as_int
from bittensor.utils import networking
from bittensor.utils.weight_utils import process_weights

import bitmind
from bitmind.chain import BittensorChain, ChainError
from bitmind.config import add_chain_args, build_config, new_parser
from tests._wallets import make_wallet

NETUID = 34
PUBLIC_IP = "93.184.216.34"
U16_MAX = 65535
BURN_RAO = 500_000_000


def like_substrate(method: Any) -> Any:
    """Make a stand-in method take exactly the parameters of the `SubstrateInterface` method of the same name."""
    real = inspect.signature(getattr(SubstrateInterface, method.__name__))

    @functools.wraps(method)
    def strict(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = real.bind(self, *args, **kwargs)  # TypeError for what the real method would refuse
        bound.apply_defaults()
        return method(self, **{name: value for name, value in bound.arguments.items() if name != "self"})

    strict.real_signature = real
    return strict


@dataclass(frozen=True)
class Call:
    module: str
    function: str
    params: dict


@dataclass(frozen=True)
class Extrinsic:
    call: Call
    signer: str
    nonce: int | None
    era: Any


@dataclass
class Receipt:
    """What bittensor reads from an `ExtrinsicReceipt`."""

    is_success: bool
    error_message: dict | None = None
    total_fee_amount: int = 1_000


@dataclass
class Stored:
    """A storage value as `SubstrateInterface.query` returns it (a ScaleType with `.value`)."""

    value: Any


# The runtime's call metadata for the calls these tests expect (parameter names as the subtensor pallet declares them).
CALL_PARAMS = {
    ("SubtensorModule", "set_mechanism_weights"): ("netuid", "mecid", "dests", "weights", "version_key"),
    ("SubtensorModule", "serve_axon"): (
        "netuid", "version", "ip", "port", "ip_type", "protocol", "placeholder1", "placeholder2"),
    ("SubtensorModule", "burned_register"): ("netuid", "hotkey"),
}


@dataclass
class CallMetadata:
    names: tuple[str, ...]

    def get_param_info(self) -> dict[str, str]:
        return {name: "value" for name in self.names}


@dataclass
class SubnetState:
    """One subnet as the chain holds it. Extrinsics are checked the way subtensor checks them (registration,
    version key, the strict weights rate limit, balance for the burn) and change it."""

    block: int = 5000
    hotkeys: list[str] = field(default_factory=list)  # index = uid
    coldkeys: list[str] = field(default_factory=list)
    last_update: list[int] = field(default_factory=list)
    axons: dict[int, dict] = field(default_factory=dict)
    weights: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    balances: dict[str, int] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=lambda: {
        "NetworksAdded": True, "CommitRevealWeightsEnabled": False, "WeightsVersionKey": 0,
        "WeightsSetRateLimit": 100, "MinAllowedWeights": 1, "MaxWeightsLimit": U16_MAX, "Burn": BURN_RAO,
    })
    submitted: list[Extrinsic] = field(default_factory=list)

    def add_neuron(self, hotkey: str, coldkey: str) -> int:
        self.hotkeys.append(hotkey)
        self.coldkeys.append(coldkey)
        self.last_update.append(0)
        return len(self.hotkeys) - 1

    def storage(self, module: str, name: str, params: list) -> Any:
        if (module, name) == ("System", "Account"):
            return {"data": {"free": self.balances.get(params[0], 0)}}
        assert module == "SubtensorModule", (module, name)
        if name == "Uids":
            netuid, hotkey = params
            return self.hotkeys.index(hotkey) if netuid == NETUID and hotkey in self.hotkeys else None
        assert params == [NETUID], (name, params)
        if name == "LastUpdate":
            return list(self.last_update)
        if name == "SubnetworkN":
            return len(self.hotkeys)
        return self.hyperparameters[name]  # KeyError: a query these tests did not expect

    def neuron(self, uid: int) -> dict | None:
        """`NeuronInfoRuntimeApi.get_neuron` as decoded."""
        if uid >= len(self.hotkeys):
            return None
        axon = self.axons.get(uid, {"version": 0, "ip": 0, "port": 0, "ip_type": 0, "protocol": 0,
                                    "placeholder1": 0, "placeholder2": 0})
        return {
            "active": True, "axon_info": {"block": 0, **axon}, "bonds": [], "coldkey": self.coldkeys[uid],
            "consensus": 0, "dividends": 0, "emission": 0, "hotkey": self.hotkeys[uid], "incentive": 0,
            "last_update": self.last_update[uid], "netuid": NETUID,
            "prometheus_info": {"block": 0, "version": 0, "ip": 0, "port": 0, "ip_type": 0},
            "stake": [], "uid": uid, "validator_permit": True, "validator_trust": 0, "weights": [],
        }

    def include(self, extrinsic: Extrinsic) -> Receipt:
        """Apply one extrinsic in the next block, or refuse it with the chain's error."""
        self.submitted.append(extrinsic)
        self.block += 1
        call, params = extrinsic.call, extrinsic.call.params
        if call.function == "burned_register":
            if self.balances.get(extrinsic.signer, 0) < self.hyperparameters["Burn"]:
                return refused("NotEnoughBalanceToStake", "The caller does not have enough balance.")
            self.balances[extrinsic.signer] -= self.hyperparameters["Burn"]
            self.add_neuron(params["hotkey"], extrinsic.signer)
            return Receipt(True)
        if extrinsic.signer not in self.hotkeys:
            return refused("HotKeyNotRegisteredInSubNet", "The hotkey is not registered in the subnet.")
        uid = self.hotkeys.index(extrinsic.signer)
        if call.function == "serve_axon":
            self.axons[uid] = {key: params[key] for key in CALL_PARAMS[("SubtensorModule", "serve_axon")][1:]}
            return Receipt(True)
        assert call.function == "set_mechanism_weights", call
        if params["version_key"] < self.hyperparameters["WeightsVersionKey"]:
            return refused("IncorrectWeightVersionKey", "The weights version key is below the subnet's.")
        if self.block - self.last_update[uid] <= self.hyperparameters["WeightsSetRateLimit"]:
            return refused("SettingWeightsTooFast", "Weights were set too recently.")
        self.last_update[uid] = self.block
        self.weights[uid] = list(zip(params["dests"], params["weights"]))
        return Receipt(True)


def refused(name: str, docs: str) -> Receipt:
    return Receipt(False, {"type": "Module", "name": name, "docs": [docs]})


class FakeSubstrate:
    """`SubstrateInterface` over a `SubnetState`: storage queries, call metadata, composing, signing, submitting."""

    def __init__(self, state: SubnetState, url: str) -> None:
        self.state = state
        self.url = url
        self.nonces: dict[str, int] = {}
        self.closed = False

    @like_substrate
    def get_block_number(self, block_hash: str | None) -> int:
        return self.state.block if block_hash is None else int(block_hash, 16)

    @like_substrate
    def get_block_hash(self, block_id: int | None) -> str:
        return f"0x{(self.state.block if block_id is None else block_id):064x}"

    @like_substrate
    def get_chain_head(self) -> str:
        return f"0x{self.state.block:064x}"

    @like_substrate
    def query(self, module: str, storage_function: str, params: list | None, block_hash: str | None,
              raw_storage_key: bytes | None, subscription_handler: Any) -> Stored:
        return Stored(self.state.storage(module, storage_function, list(params or [])))

    @like_substrate
    def runtime_call(self, api: str, method: str, params: list | dict | None, block_hash: str | None) -> Any:
        assert (api, method) == ("NeuronInfoRuntimeApi", "get_neuron"), (api, method)
        netuid, uid = params
        return self.state.neuron(uid) if netuid == NETUID else None

    @like_substrate
    def get_metadata_call_function(self, module_name: str, call_function_name: str,
                                   block_hash: str | None) -> CallMetadata | None:
        names = CALL_PARAMS.get((module_name, call_function_name))
        return None if names is None else CallMetadata(names)

    @like_substrate
    def compose_call(self, call_module: str, call_function: str, call_params: dict | None,
                     block_hash: str | None) -> Call:
        return Call(call_module, call_function, dict(call_params or {}))

    @like_substrate
    def get_account_next_index(self, account_address: str) -> int:
        return self.nonces.get(account_address, 0)

    @like_substrate
    def create_signed_extrinsic(self, call: Call, keypair: Any, era: Any, nonce: int | None, tip: int,
                                tip_asset_id: int | None, signature: Any) -> Extrinsic:
        assert tip == 0 and tip_asset_id is None and signature is None
        return Extrinsic(call=call, signer=keypair.ss58_address, nonce=nonce, era=era)

    @like_substrate
    def submit_extrinsic(self, extrinsic: Extrinsic, wait_for_inclusion: bool,
                         wait_for_finalization: bool) -> Receipt:
        assert wait_for_inclusion, "every extrinsic of ours waits for inclusion"
        self.nonces[extrinsic.signer] = self.nonces.get(extrinsic.signer, 0) + 1
        return self.state.include(extrinsic)

    @like_substrate
    def close(self) -> None:
        self.closed = True


@pytest.fixture
def state() -> SubnetState:
    return SubnetState()


@pytest.fixture
def substrates(monkeypatch: pytest.MonkeyPatch, state: SubnetState) -> list[FakeSubstrate]:
    """Every connection `bt.Subtensor` opens gets a FakeSubstrate over `state`, built from the real arguments."""
    made: list[FakeSubstrate] = []
    real = inspect.signature(SubstrateInterface)

    def connect(*args: Any, **kwargs: Any) -> FakeSubstrate:
        arguments = real.bind(*args, **kwargs).arguments
        made.append(FakeSubstrate(state, arguments["url"]))
        return made[-1]

    monkeypatch.setattr(subtensor_module, "SubstrateInterface", connect)
    return made


@pytest.fixture
def wallets(tmp_path: Path) -> dict[str, bt.Wallet]:
    return {name: make_wallet(tmp_path / "wallets", name) for name in ("validator", "miner", "newcomer")}


@pytest.fixture
def chain(substrates: list[FakeSubstrate]) -> BittensorChain:
    parser = new_parser("test")
    add_chain_args(parser)
    made = BittensorChain(build_config(parser, ["--netuid", str(NETUID), "--chain.timeout", "30"]))
    yield made
    made.close()


def subnet(state: SubnetState, wallets: dict[str, bt.Wallet], miners: int = 3) -> None:
    """The validator at uid 0 and `miners` other neurons (uids 1..miners)."""
    for name in ("validator", "miner"):
        state.add_neuron(wallets[name].hotkey.ss58_address, wallets[name].coldkeypub.ss58_address)
    for index in range(miners - 1):
        state.add_neuron(f"5Miner{index}", "5Cold")


# ---- the stand-in itself --------------------------------------------------------------------------------------


def test_every_stand_in_method_takes_exactly_the_real_substrate_interfaces_parameters(state: SubnetState) -> None:
    public = [name for name, value in vars(FakeSubstrate).items() if not name.startswith("_") and callable(value)]
    assert len(public) == 11
    for name in public:
        assert getattr(FakeSubstrate, name).real_signature == inspect.signature(getattr(SubstrateInterface, name))
    fake = FakeSubstrate(state, "ws://fake")
    with pytest.raises(TypeError, match="unexpected keyword argument 'block'"):
        fake.query("SubtensorModule", "Burn", [NETUID], block=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'period'"):
        fake.submit_extrinsic(extrinsic=None, wait_for_inclusion=True, period=5)


def test_the_real_subtensor_is_built_on_the_stand_in(chain: BittensorChain, substrates: list[FakeSubstrate],
                                                     state: SubnetState) -> None:
    assert chain.block() == state.block
    assert len(substrates) == 1 and substrates[0].url == "wss://entrypoint-finney.opentensor.ai:443"
    chain.close()
    assert substrates[0].closed


# ---- set_weights ------------------------------------------------------------------------------------------------


def test_one_set_weights_sends_one_extrinsic_with_u16_weights_and_our_version_key(
    chain: BittensorChain, state: SubnetState, wallets: dict[str, bt.Wallet]
) -> None:
    subnet(state, wallets)
    ok, message = chain.set_weights(wallets["validator"], [1, 2, 0], [3.0, 1.0, 0.0], version_key=bitmind.spec_version)
    assert (ok, message) == (True, "Success")
    [extrinsic] = state.submitted
    assert (extrinsic.call.module, extrinsic.call.function) == ("SubtensorModule", "set_mechanism_weights")
    assert extrinsic.call.params == {
        "netuid": NETUID, "mecid": 0, "dests": [1, 2], "weights": [U16_MAX, 21845], "version_key": bitmind.spec_version,
    }
    assert extrinsic.signer == wallets["validator"].hotkey.ss58_address  # weights are signed by the hotkey
    assert extrinsic.nonce == 0 and extrinsic.era == {"period": 128}
    assert state.weights[0] == [(1, U16_MAX), (2, 21845)] and state.last_update[0] == state.block


def test_the_subnets_max_weight_limit_is_applied_before_u16_conversion(
    chain: BittensorChain, state: SubnetState, wallets: dict[str, bt.Wallet]
) -> None:
    subnet(state, wallets)
    state.hyperparameters["MaxWeightsLimit"] = 39321  # 0.6 as u16
    ok, message = chain.set_weights(wallets["validator"], [1, 2, 3], [6.0, 1.0, 1.0], version_key=1)
    assert ok, message
    # what bittensor's own process_weights gives for this subnet, then scaled so the largest weight is u16 max
    uids, weights = process_weights(np.array([1, 2, 3]), np.array([6.0, 1.0, 1.0], dtype=np.float32), num_neurons=4,
                                    min_allowed_weights=1, max_weight_limit=39321 / U16_MAX)
    assert float(weights.max()) == pytest.approx(0.6, abs=1e-4)
    expected = [round(float(w) / float(weights.max()) * U16_MAX) for w in weights]
    assert state.submitted[0].call.params["dests"] == uids.tolist() == [1, 2, 3]
    # uncapped, 6:1:1 would give [U16_MAX, 10923, 10923]; capped at 0.6 the rest is spread: 0.6, 0.2, 0.2
    assert state.submitted[0].call.params["weights"] == expected == [U16_MAX, 21845, 21845]


def test_a_refused_try_is_still_exactly_one_extrinsic(
    chain: BittensorChain, state: SubnetState, wallets: dict[str, bt.Wallet]
) -> None:
    subnet(state, wallets)
    state.hyperparameters["WeightsVersionKey"] = bitmind.spec_version + 1
    ok, message = chain.set_weights(wallets["validator"], [1], [1.0], version_key=bitmind.spec_version)
    assert not ok and "IncorrectWeightVersionKey" in message
    assert len(state.submitted) == 1
    # what our max_attempts=1 prevents: bittensor's default resends a refused extrinsic up to 5 times per call
    with bt.Subtensor(network="finney") as raw:
        raw.set_weights(wallets["validator"], NETUID, [1], [1.0], version_key=bitmind.spec_version,
                        wait_for_finalization=False)
    assert len(state.submitted) == 1 + 5


def test_bittensors_own_rate_limit_check_is_strict_and_weights_rules_predicts_it(
    chain: BittensorChain, state: SubnetState, wallets: dict[str, bt.Wallet]
) -> None:
    subnet(state, wallets)
    state.hyperparameters["WeightsSetRateLimit"] = 10
    state.last_update[0] = state.block - 10  # exactly the rate limit: subtensor wants strictly more
    hotkey = wallets["validator"].hotkey.ss58_address
    rules = chain.weights_rules(hotkey)
    assert (rules.blocks_since_update, rules.rate_limit, rules.blocks_to_wait()) == (10, 10, 1)
    assert chain.set_weights(wallets["validator"], [1], [1.0], 1) == (False, "rate limited or rejected")
    assert state.submitted == []  # bittensor refused before sending anything
    state.block += 1
    assert chain.weights_rules(hotkey).blocks_to_wait() == 0
    ok, message = chain.set_weights(wallets["validator"], [1], [1.0], 1)
    assert ok, message
    assert len(state.submitted) == 1


def test_weights_rules_read_the_subnets_weights_version(
    chain: BittensorChain, state: SubnetState, wallets: dict[str, bt.Wallet]
) -> None:
    subnet(state, wallets)
    ours = bitmind.spec_version
    state.hyperparameters["WeightsVersionKey"] = ours + 80
    rules = chain.weights_rules(wallets["validator"].hotkey.ss58_address)
    assert (rules.block, rules.weights_version, rules.blocks_since_update) == (state.block, ours + 80, state.block)
    problem = rules.version_problem(ours)
    assert f"version_key >= {ours + 80}" in problem and f"sends {ours}" in problem
    state.hyperparameters["WeightsVersionKey"] = ours
    assert chain.weights_rules(wallets["validator"].hotkey.ss58_address).version_problem(ours) is None
    assert state.submitted == []


def test_weights_rules_of_a_subnet_that_does_not_exist_is_a_chain_error(
    chain: BittensorChain, state: SubnetState
) -> None:
    state.hyperparameters["NetworksAdded"] = False
    with pytest.raises(ChainError, match=f"netuid {NETUID} does not exist"):
        chain.weights_rules("5Anyone")


# ---- serve_axon -------------------------------------------------------------------------------------------------


def test_serve_axon_sends_one_serve_axon_extrinsic_and_none_when_already_served(
    chain: BittensorChain, state: SubnetState, wallets: dict[str, bt.Wallet]
) -> None:
    subnet(state, wallets)
    chain.serve_axon(wallets["miner"], PUBLIC_IP, 8091)
    [extrinsic] = state.submitted
    assert (extrinsic.call.module, extrinsic.call.function) == ("SubtensorModule", "serve_axon")
    assert extrinsic.call.params == {
        "netuid": NETUID, "version": version_as_int, "ip": networking.ip_to_int(PUBLIC_IP), "port": 8091,
        "ip_type": 4, "protocol": 4, "placeholder1": 0, "placeholder2": 0,
    }
    assert extrinsic.signer == wallets["miner"].hotkey.ss58_address
    chain.serve_axon(wallets["miner"], PUBLIC_IP, 8091)  # bittensor sees it on chain already
    assert len(state.submitted) == 1
    chain.serve_axon(wallets["miner"], PUBLIC_IP, 9000)
    assert len(state.submitted) == 2 and state.axons[1]["port"] == 9000


def test_serve_axon_refusals_are_chain_errors_that_say_what_to_do(
    chain: BittensorChain, state: SubnetState, wallets: dict[str, bt.Wallet]
) -> None:
    subnet(state, wallets)
    with pytest.raises(ChainError, match="127.0.0.1 is a loopback address .* set --axon.external_ip "
                                         r"\(AXON_EXTERNAL_IP in the env file\)"):
        chain.serve_axon(wallets["miner"], "127.0.0.1", 8091)
    assert state.submitted == []
    with pytest.raises(ChainError, match=r"serve_axon .* rejected: .*HotKeyNotRegisteredInSubNet"):
        chain.serve_axon(wallets["newcomer"], PUBLIC_IP, 8091)
    assert len(state.submitted) == 1


# ---- register ---------------------------------------------------------------------------------------------------


def test_register_burns_once_for_a_new_hotkey_and_never_for_a_registered_one(
    chain: BittensorChain, state: SubnetState, wallets: dict[str, bt.Wallet]
) -> None:
    subnet(state, wallets)
    assert chain.register(wallets["miner"]) == 1
    assert state.submitted == []
    coldkey = wallets["newcomer"].coldkeypub.ss58_address
    state.balances[coldkey] = BURN_RAO + 7
    assert chain.register(wallets["newcomer"]) == 4  # the next free uid
    [extrinsic] = state.submitted
    assert (extrinsic.call.module, extrinsic.call.function) == ("SubtensorModule", "burned_register")
    assert extrinsic.call.params == {"netuid": NETUID, "hotkey": wallets["newcomer"].hotkey.ss58_address}
    assert extrinsic.signer == coldkey and state.balances[coldkey] == 7  # the coldkey pays the burn
    assert chain.register(wallets["newcomer"]) == 4 and len(state.submitted) == 1


def test_a_refused_registration_is_a_chain_error_naming_the_reason(
    chain: BittensorChain, state: SubnetState, wallets: dict[str, bt.Wallet]
) -> None:
    subnet(state, wallets)
    with pytest.raises(ChainError, match=r"burned_register of \w+ on netuid 34 rejected: .*NotEnoughBalanceToStake"):
        chain.register(wallets["newcomer"])
    assert len(state.submitted) == 1
