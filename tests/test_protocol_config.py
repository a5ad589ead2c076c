"""Protocol compatibility with subnet 34 and the command-line trap of bittensor 10.5."""

import bittensor as bt
import pydantic
import pytest

import bitmind
from bitmind import protocol
from bitmind.config import add_chain_args, add_neuron_args, build_config, new_parser
from tests import _reference_protocol as reference_protocol


def test_spec_version_follows_the_subnet_formula():
    major, minor, patch = (int(x) for x in bitmind.__version__.split("."))
    assert protocol.spec_version == 1000 * major + 10 * minor + patch
    assert protocol.__version__ == bitmind.__version__


def test_image_synapse_defaults():
    synapse = protocol.ImageSynapse(image="aGVsbG8=")
    assert synapse.prediction == -1.0 == protocol.NO_ANSWER
    assert synapse.deserialize() == -1.0


@pytest.mark.parametrize("reference", [reference_protocol.ImageSynapse, reference_protocol.ImageSynapseV1])
def test_body_hash_is_the_subnets(reference):
    """A miner's axon recomputes the body hash with its own class: it must hash what the subnet's validators hash
    (no field), or every one of their requests fails with a hash mismatch."""
    for image in ("aGVsbG8=", "d29ybGQ="):
        assert protocol.ImageSynapse(image=image).body_hash == reference(image=image).body_hash
    assert not protocol.ImageSynapse.required_hash_fields and not protocol.VideoSynapse.required_hash_fields


@pytest.mark.parametrize("sent, read", [
    ([-1.0, -1.0, -1.0], protocol.NO_ANSWER),  # the 2.x default: no answer
    ([0.2, 0.5, 0.3], 0.8),  # [real, synthetic, semi-synthetic]: the generated share
    (["0.1", "0.9", "0"], 0.9),
    (0.3, 0.3),
])
def test_three_class_predictions_read_as_the_generated_share(sent, read):
    assert protocol.ImageSynapse(prediction=sent).prediction == pytest.approx(read)
    assert protocol.VideoSynapse(prediction=sent).prediction == pytest.approx(read)


@pytest.mark.parametrize("bad", [[1, 2], [0.1, 0.2, 0.3, 0.4], ["x", 0.5, 0.5], [None, 0.5, 0.5], {"p": 1}])
def test_other_lists_are_refused(bad):
    with pytest.raises(pydantic.ValidationError):
        protocol.ImageSynapse(prediction=bad)


def test_prediction_rejects_non_numbers():
    with pytest.raises(Exception):
        protocol.ImageSynapse(image="", prediction="fake")


def _parser():
    parser = new_parser("test", axon=True)
    add_chain_args(parser)
    add_neuron_args(parser, "miner")
    return parser


def test_command_line_flags_reach_the_config():
    config = build_config(
        _parser(),
        [
            "--netuid", "7",
            "--chain", "local",
            "--chain.path", "/tmp/chain.sqlite",
            "--wallet.name", "alice",
            "--wallet.hotkey", "h1",
            "--axon.port", "9123",
            "--neuron.device", "cpu",
            "--subtensor.network", "test",
        ],
    )
    assert config.netuid == 7
    assert config.chain.backend == "local" and config.chain.path == "/tmp/chain.sqlite"
    assert config.wallet.name == "alice" and config.wallet.hotkey == "h1"
    assert config.axon.port == 9123
    assert config.neuron.device == "cpu"
    assert config.subtensor.network == "test"
    # bittensor objects accept the nested config
    assert bt.Wallet(config=config).name == "alice"


def test_defaults_without_arguments_do_not_read_sys_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog", "--netuid", "99"])
    config = build_config(_parser(), [])
    assert config.netuid == 34 and config.chain.backend == "bittensor"


def test_mistyped_flag_is_an_error_not_silently_ignored(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_config(_parser(), ["--neuron.devise", "cpu"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_invalid_choice_is_rejected():
    with pytest.raises(SystemExit):
        build_config(_parser(), ["--chain", "mainnet"])


def test_required_fields_match_the_schema_and_headers_still_build():
    synapse = protocol.ImageSynapse(image="aGVsbG8=")
    assert synapse.get_required_fields() == protocol.ImageSynapse.model_json_schema().get("required", [])
    headers = synapse.to_headers()
    assert headers["name"] == "ImageSynapse"


def _real_parsers():
    from neurons.miner import build_parser as miner_parser
    from neurons.validator import build_parser as validator_parser

    return {"miner": miner_parser, "validator": validator_parser}


@pytest.mark.parametrize("process", ["miner", "validator"])
@pytest.mark.parametrize(
    ("argv", "endpoint", "network"),
    [
        ([], "wss://entrypoint-finney.opentensor.ai:443", "finney"),
        (["--subtensor.network", "test"], "wss://test.finney.opentensor.ai:443", "test"),
        (["--subtensor.network", "ws://127.0.0.1:9944"], "ws://127.0.0.1:9944", "local"),
        (["--subtensor.chain_endpoint", "ws://127.0.0.1:9944"], "ws://127.0.0.1:9944", "local"),
        (["--subtensor.network", "finney", "--subtensor.chain_endpoint", "wss://lite.example.org:443"],
         "wss://lite.example.org:443", "unknown"),
    ],
    ids=["defaults", "network", "endpoint-as-network", "endpoint", "endpoint-beside-network"],
)
def test_the_chain_bittensor_connects_to_is_the_one_given(process, argv, endpoint, network):
    """bittensor's own resolution (the one `bt.Subtensor(config=...)` runs) on the config our parser builds."""
    config = build_config(_real_parsers()[process](), argv)
    assert bt.Subtensor.setup_config(None, config) == (endpoint, network)
