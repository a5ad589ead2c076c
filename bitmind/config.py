"""Command-line configuration shared by every process.

Each process builds one argparse parser: bittensor's `--wallet.* --subtensor.* --axon.* --logging.*` plus ours
(`--netuid`, `--chain*`, `--neuron.*`, and the role's own). `build_config` parses it STRICTLY (a mistyped flag is an
error, not silently ignored) and returns a nested `bt.Config`. We never let `bt.Config` read argv itself: in
bittensor 10.5 it ignores argv unless `BT_NO_PARSE_CLI_ARGS=false`, and it falls back to `sys.argv` when handed an
empty list.
"""

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import bittensor as bt

__all__ = [
    "DEFAULT_NETUID",
    "add_chain_args",
    "add_metrics_args",
    "add_neuron_args",
    "add_state_dir_arg",
    "build_config",
    "new_parser",
    "setup_logging",
]

DEFAULT_NETUID = 34
DEFAULT_HOME = Path(os.environ.get("BITMIND_HOME", "~/.bitmind")).expanduser()


def new_parser(description: str, axon: bool = False) -> argparse.ArgumentParser:
    """A parser with bittensor's wallet, subtensor and logging arguments (and axon ones for servers)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    bt.Wallet.add_args(parser)
    bt.Subtensor.add_args(parser)
    bt.logging.add_args(parser)
    if axon:
        bt.Axon.add_args(parser)
    parser.add_argument("--netuid", type=int, default=DEFAULT_NETUID, help="Subnet to serve / validate on.")
    return parser


def add_chain_args(parser: argparse.ArgumentParser) -> None:
    """`--chain bittensor|local` picks the chain backend; `--chain.path` is the LocalChain SQLite file."""
    parser.add_argument(
        "--chain",
        dest="chain.backend",
        choices=("bittensor", "local"),
        default="bittensor",
        help="Chain backend: the real subtensor, or a LocalChain SQLite file shared by local processes.",
    )
    parser.add_argument(
        "--chain.path",
        type=str,
        default=str(DEFAULT_HOME / "localchain.sqlite"),
        help="SQLite file of the local chain (with --chain local).",
    )
    parser.add_argument(
        "--chain.timeout", type=float, default=60.0, help="Seconds before any chain call is abandoned."
    )
    parser.add_argument(
        "--chain.seconds_per_block",
        type=float,
        default=12.0,
        help="Block time of a newly created local chain (with --chain local).",
    )


def add_state_dir_arg(parser: argparse.ArgumentParser, role: str) -> None:
    """`--neuron.state_dir`, defaulting to DEFAULT_HOME/<role>."""
    parser.add_argument(
        "--neuron.state_dir",
        type=str,
        default=str(DEFAULT_HOME / role),
        help="Folder for this neuron's state, heartbeat and caches.",
    )


def add_metrics_args(parser: argparse.ArgumentParser) -> None:
    """`--neuron.metrics_port` and `--neuron.metrics_host` (Prometheus endpoint)."""
    parser.add_argument(
        "--neuron.metrics_port",
        type=int,
        default=0,
        help="Port for Prometheus metrics on 127.0.0.1 (0 disables them).",
    )
    parser.add_argument(
        "--neuron.metrics_host", type=str, default="127.0.0.1", help="Interface the metrics endpoint binds to."
    )


def add_neuron_args(parser: argparse.ArgumentParser, role: str) -> None:
    """Flags every chain neuron has: state folder, device, sync cadence, metrics.

    The generator has no chain and its own `--generator.device`: it takes `add_state_dir_arg` and
    `add_metrics_args` only.
    """
    add_state_dir_arg(parser, role)
    parser.add_argument(
        "--neuron.device", type=str, default="auto", help="Torch device: auto (CUDA when present), cpu, cuda, cuda:1 ..."
    )
    parser.add_argument(
        "--neuron.sync_interval", type=float, default=300.0, help="Seconds between metagraph syncs."
    )
    add_metrics_args(parser)


def _nest(flat: dict[str, Any]) -> bt.Config:
    config = bt.Config()
    for key, value in flat.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = bt.Config()
                node[part] = child
            node = child
        node[leaf] = value
    return config


def build_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> bt.Config:
    """Parse `argv` (default: the process's arguments) strictly into a nested `bt.Config`.

    A `--subtensor.chain_endpoint` other than bittensor's default also becomes `subtensor.network`: bittensor
    resolves the network after the endpoint and the network always has a value (finney), so the endpoint would
    otherwise be ignored without a word.
    """
    values = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    endpoint = values.get("subtensor.chain_endpoint")
    if endpoint and endpoint != parser.get_default("subtensor.chain_endpoint"):
        values["subtensor.network"] = endpoint
    return _nest(values)


def setup_logging(config: bt.Config) -> None:
    """One line per event: time, level, component, message."""
    level = logging.INFO
    if config.get("logging") and (config.logging.get("debug") or config.logging.get("trace")):
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )
