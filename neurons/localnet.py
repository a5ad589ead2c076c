"""bitmind-localnet: a whole subnet on this machine (CPU only, offline) in one command.

Why: an operator should see miners, a validator and the generator work together, and how scores and weights
separate a trained detector from a poor one, before registering on subnet 34. Everything runs as separate real
processes on 127.0.0.1, exactly the commands an operator would run, sharing a LocalChain SQLite file:

    chain + wallets (uid 0: the validator, with stake; uids 1..N: miners)
    miners    python -m neurons.miner     --neuron.detector camo | npr | baseline | ...
    generator python -m neurons.generator a tiny random Stable Diffusion pipeline built at start
    validator python -m neurons.validator real images: the package's sample; fakes: the packaged AI-generated
                                          sample seeded into the synthetic cache, plus the generator's images

The orchestrator starts the miners, waits until each one serves its axon, then starts the validator (so no miner
is scored before it can answer), prints a leaderboard as the validator's step count advances, and stops after
`--rounds` steps or Ctrl-C. Every child runs in its own session with its output in `<workdir>/logs`; whatever
ends the run (the last round, Ctrl-C, SIGTERM, a child that dies, an error here), every child's process group
gets SIGTERM, then SIGKILL, so no process is left behind. `<workdir>/localnet.json` lists the children with
their pids, uids and hotkeys for scripts and tests.
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("READ_ONLY", "1")  # before bittensor is imported: the orchestrator writes nothing home

from base_miner.registry import ConfigError, load_config  # noqa: E402
from bitmind.atomic import atomic_write_bytes  # noqa: E402
from bitmind.chain.base import ChainError  # noqa: E402
from bitmind.chain.local import LocalChain  # noqa: E402
from bitmind.console import Console  # noqa: E402
from bitmind.dev_wallets import make_wallet  # noqa: E402
from bitmind.ports import free_ports, port_answers  # noqa: E402
from bitmind.supervisor import STOP_GRACE_S, Child, Supervisor  # noqa: E402
from neurons.localnet_leaderboard import (  # noqa: E402
    Leaderboard,
    MinerInfo,
    build_leaderboard,
    read_validator_state,
)
from validator.challenges.synthetic_seed import (  # noqa: E402
    SampleError,
    packaged_synthetic_sample,
    seed_synthetic_cache,
)
from validator.state import ValidatorState  # noqa: E402

__all__ = ["LocalnetError", "build_parser", "main"]

NETUID = 34
DEFAULT_MINERS = "camo,npr,baseline"
DEFAULT_ROUNDS = 40  # EMA scores (alpha 0.05) reach 87 % of their steady value: the ranking has settled
MAX_MINERS = 16
VALIDATOR_NAME = "localnet-validator"
VALIDATOR_STAKE = 1000.0
LOOPBACK = "127.0.0.1"
STATUS_FILE = "localnet.json"
POLL_S = 0.25
# One torch thread per child unless the caller chose otherwise: N + 2 processes share the cores, and thread
# contention on a 2-core machine makes each one several times slower.
CHILD_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Children never reach the internet or write to the home folder.
CHILD_ENV = {
    "READ_ONLY": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
}


class LocalnetError(RuntimeError):
    """The local subnet cannot start or went down; the message names the cause (and a child's log tail)."""


class Interrupted(Exception):
    """SIGINT / SIGTERM / SIGHUP reached the orchestrator."""


# ---------------------------------------------------------------------------------------------------- flags
def _number(kind: type, minimum: float, strict: bool) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` above (`strict`) or at least `minimum`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number ({kind.__name__}), got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            bound = f"{'>' if strict else '>='} {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitmind-localnet",
        description="Run a whole subnet-34 network on 127.0.0.1 (CPU, offline): a local chain, miners, a validator "
        "and a generator, with a live leaderboard.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--miners",
        default=DEFAULT_MINERS,
        help="Comma list of miner detectors: packaged config names (camo, npr, generalist, ucf, baseline, "
        "baseline_random) or detector YAML files; one miner process each.",
    )
    parser.add_argument(
        "--rounds",
        type=_number(int, 0, strict=False),
        default=DEFAULT_ROUNDS,
        help="Stop after the validator has scored this many challenges (0: run until Ctrl-C).",
    )
    parser.add_argument("--summary", type=Path, default=None, help="Write the final leaderboard as JSON here.")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="Empty or new folder for the chain, wallets, caches, state and logs; kept afterwards "
        "(default: a fresh temporary folder, removed at the end unless --keep).",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the temporary work folder.")
    parser.add_argument(
        "--seconds-per-block", type=_number(float, 0, strict=True), default=1.0, help="Block time of the local chain."
    )
    parser.add_argument(
        "--epoch-length",
        type=_number(int, 0, strict=True),
        default=5,
        help="Blocks between the validator's weight settings; the local chain's weights_rate_limit is one less, "
        "since the chain accepts weights once strictly more blocks than the limit have passed.",
    )
    parser.add_argument(
        "--step-interval",
        type=_number(float, 0, strict=False),
        default=0.5,
        help="Seconds between the starts of two validator steps.",
    )
    parser.add_argument(
        "--query-timeout",
        type=_number(float, 0, strict=True),
        default=9.0,
        help="Seconds the validator waits for a miner's answer.",
    )
    parser.add_argument(
        "--augment-probs",
        default="0:0.5,1:0.5",
        help="Validator augmentation levels (--validator.augment_probs). The shipped sample images are 32x32 CIFAKE "
        "photos; levels 2-3 (JPEG, noise, blur on an 8x up-scaled image) leave little any detector can see, so the "
        "demo uses levels 0-1; pass 0:0.1,1:0.3,2:0.3,3:0.3 for the validator's default.",
    )
    parser.add_argument(
        "--startup-timeout",
        type=_number(float, 0, strict=True),
        default=300.0,
        help="Seconds each start-up phase may take (miners serving, validator running) before giving up.",
    )
    parser.add_argument(
        "--seed",
        type=_number(int, 0, strict=False),
        default=None,
        help="Seed of the validator's and the generator's random draws, for repeatable runs (default: fresh).",
    )
    parser.add_argument(
        "--fake-sample",
        type=Path,
        default=None,
        help="Folder of AI-generated images to seed the synthetic cache with (default: the packaged sample).",
    )
    parser.add_argument(
        "--tolerate-miner-exit",
        action="store_true",
        help="A miner that exits keeps its uid and just stops answering (its score decays) instead of ending "
        "the run.",
    )
    return parser


# ---------------------------------------------------------------------------------------------------- set-up
@dataclass(frozen=True)
class MinerSpec:
    index: int
    detector: str  # as given: a packaged config name or a YAML path
    label: str  # short name for the leaderboard
    wallet_name: str


def parse_miners(text: str) -> list[MinerSpec]:
    """`camo,npr,baseline` -> miner specs; every entry must name a packaged detector config or a YAML file."""
    entries = [part.strip() for part in text.split(",")]
    if not entries or any(not entry for entry in entries):
        raise LocalnetError(f"--miners must be a comma list of detector names, got {text!r}")
    if len(entries) > MAX_MINERS:
        raise LocalnetError(f"--miners lists {len(entries)} miners; at most {MAX_MINERS} run on one machine")
    specs = []
    for index, entry in enumerate(entries, start=1):
        try:
            load_config(entry)
        except ConfigError as exc:
            raise LocalnetError(f"--miners entry {index} ({entry!r}): {exc}") from None
        path = Path(entry).expanduser()
        if path.exists():  # a YAML file: the miner runs in the work folder, so hand it an absolute path
            entry, label = str(path.resolve()), path.stem
        else:
            label = entry
        specs.append(MinerSpec(index, entry, label, f"localnet-miner{index}"))
    return specs


def _project_root() -> Path:
    return Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- the network
class Localnet:
    """Owns the work folder, the chain and the children for one run."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.miner_specs = parse_miners(args.miners)
        if args.fake_sample is not None and not args.fake_sample.is_dir():
            raise LocalnetError(f"--fake-sample {args.fake_sample} is not a folder")
        self.fake_sample = args.fake_sample or packaged_synthetic_sample()
        if args.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="bitmind-localnet-"))
            self.remove_workdir = not args.keep
        else:
            self.workdir = args.workdir.expanduser().resolve()
            if self.workdir.exists() and (not self.workdir.is_dir() or any(self.workdir.iterdir())):
                raise LocalnetError(f"--workdir {self.workdir} must be an empty or new folder")
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.remove_workdir = False
        self.logs = self.workdir / "logs"
        self.chain_path = self.workdir / "chain.sqlite"
        self.wallets = self.workdir / "wallets"
        self.synthetic_cache = self.workdir / "synthetic_cache"
        self.validator_state = self.workdir / "validator"
        env = {**CHILD_THREADS, **os.environ, **CHILD_ENV, "HF_HOME": str(self.workdir / "hf_home")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_project_root()), env.get("PYTHONPATH", "")) if p)
        self.supervisor = Supervisor(env, cwd=self.workdir)
        self.chain: LocalChain | None = None
        self.validator_hotkey = ""
        self.miners: list[MinerInfo] = []
        self.timings: dict[str, float] = {}

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def run(self) -> int:
        started = time.monotonic()
        self.console.event(f"work folder {self.workdir} (logs in {self.logs})")
        self._phase("chain and wallets", self._register)
        self._phase("synthetic cache", self._seed_cache)
        self._start_miners()
        self._phase("tiny pipeline (miners loading meanwhile)", self._start_generator)
        self._phase("rest of the miners' start-up", self._wait_for_miners)
        self._phase("validator's first round", self._start_validator)
        self.console.event(
            "start-up " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.timings.items())
            + f"; total {time.monotonic() - started:.1f} s"
        )
        self._watch()
        return 0

    def _phase(self, name: str, action: Callable[[], None]) -> None:
        started = time.monotonic()
        action()
        self.timings[name] = time.monotonic() - started

    def stop(self) -> None:
        """Stop the validator first (so no last challenge meets miners already gone), then every other child; the
        chain and the validator's state are final afterwards."""
        validators = [child for child in self.supervisor.children if child.role == "validator"]
        killed = self.supervisor.stop(validators) + self.supervisor.stop_all()
        if killed:
            self.console.event(f"killed {', '.join(killed)}: still running {STOP_GRACE_S:g} s after SIGTERM")
        self.console.event("all processes stopped")

    def close(self) -> None:
        if self.chain is not None:
            self.chain.close()
        if self.remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _register(self) -> None:
        self.chain = LocalChain(
            self.chain_path,
            netuid=NETUID,
            seconds_per_block=self.args.seconds_per_block,
            # strict rule (blocks since the last weights > limit): one less lets weights land every epoch_length
            weights_rate_limit=self.args.epoch_length - 1,
        )
        validator = make_wallet(self.wallets, VALIDATOR_NAME)
        self.validator_hotkey = validator.hotkey.ss58_address
        coldkey = validator.coldkeypub.ss58_address
        uid = self.chain.register_hotkey(self.validator_hotkey, coldkey, stake=VALIDATOR_STAKE)
        self.console.event(f"local chain {self.chain_path}: validator uid {uid} ({self.validator_hotkey[:8]})")
        for spec in self.miner_specs:
            wallet = make_wallet(self.wallets, spec.wallet_name)
            hotkey = wallet.hotkey.ss58_address
            uid = self.chain.register_hotkey(hotkey, wallet.coldkeypub.ss58_address)
            self.miners.append(MinerInfo(uid=uid, hotkey=hotkey, detector=spec.label))

    def _seed_cache(self) -> None:
        if self.fake_sample is None:
            self.console.event(
                "WARNING: no AI-generated sample is packaged; fakes come only from the tiny random diffusion "
                "pipeline (noise), so the leaderboard says little about the detectors"
            )
            return
        try:
            count = seed_synthetic_cache(self.synthetic_cache, self.fake_sample)
        except SampleError as exc:
            raise LocalnetError(str(exc)) from None
        self.console.event(f"synthetic cache seeded with {count} AI-generated images from {self.fake_sample}")

    def _start_miners(self) -> None:
        python = sys.executable
        for spec, info, port in zip(self.miner_specs, self.miners, free_ports(len(self.miners))):
            name = f"miner{spec.index}-{spec.label}"
            argv = [
                python, "-m", "neurons.miner", "--chain", "local", "--chain.path", str(self.chain_path),
                "--wallet.path", str(self.wallets), "--wallet.name", spec.wallet_name, "--wallet.hotkey", "default",
                "--axon.ip", LOOPBACK, "--axon.port", str(port), "--axon.external_ip", LOOPBACK,
                "--neuron.detector", spec.detector, "--neuron.device", "cpu", "--miner.torch_threads", "1",
                "--miner.workers", "1",  # three miners already share the cores
                "--neuron.state_dir", str(self.workdir / name), "--neuron.sync_interval", "10",
            ]
            extra = {"uid": info.uid, "hotkey": info.hotkey, "detector": spec.label, "port": port}
            self._start(Child(name, "miner", argv, self.logs / f"{name}.log", extra))

    def _start_generator(self) -> None:
        """Build the tiny random Stable Diffusion pipeline (in a child, while the miners load), then start the
        generator on it."""
        pipeline = self.workdir / "models" / "tiny-sd"
        code = (
            "import pathlib, sys; from validator.generation.tiny_models import build_tiny_sd; "
            "build_tiny_sd(pathlib.Path(sys.argv[1]))"
        )
        builder = self._start(
            Child("build-tiny-sd", "setup", [sys.executable, "-c", code, str(pipeline)],
                  self.logs / "build-tiny-sd.log", one_shot=True)
        )
        self._wait(lambda: builder.exit_code() == 0, "the tiny diffusion pipeline to be built", builder)
        argv = [
            sys.executable, "-m", "neurons.generator",
            "--generator.cache_dir", str(self.synthetic_cache),
            "--generator.models", str(pipeline),
            "--generator.prompt_mode", "static", "--generator.captioner", "none", "--generator.rewriter", "none",
            "--generator.resolution", "64", "--generator.steps", "2", "--generator.device", "cpu",
            "--generator.batch", "1", "--generator.interval", "10",
            "--generator.real_source", "packaged", "--neuron.state_dir", str(self.workdir / "generator"),
            *self._seed_flag("generator"),
        ]
        self._start(Child("generator", "generator", argv, self.logs / "generator.log"))

    def _wait_for_miners(self) -> None:
        miners = [child for child in self.supervisor.children if child.role == "miner"]
        self._wait(lambda: all(self._serving(child) for child in miners), "every miner to serve its axon", *miners)

    def _serving(self, child: Child) -> bool:
        """The miner's port answers and the chain advertises its axon there."""
        if not port_answers(LOOPBACK, child.extra["port"]):
            return False
        view = self.chain.sync()
        uid = child.extra["uid"]
        return uid in view.uids and view.axons[view.uids.index(uid)].port == child.extra["port"]

    def _start_validator(self) -> None:
        args = self.args
        argv = [
            sys.executable, "-m", "neurons.validator", "--chain", "local", "--chain.path", str(self.chain_path),
            "--wallet.path", str(self.wallets), "--wallet.name", VALIDATOR_NAME, "--wallet.hotkey", "default",
            "--neuron.device", "cpu", "--neuron.state_dir", str(self.validator_state),
            "--neuron.sample_size", str(len(self.miners)), "--neuron.timeout", str(args.query_timeout),
            "--neuron.epoch_length", str(args.epoch_length), "--neuron.step_interval", str(args.step_interval),
            "--neuron.sync_interval", "10", "--validator.external_ip", LOOPBACK,
            "--validator.real_datasets", "packaged", "--validator.real_cache", str(self.workdir / "validator_real"),
            "--validator.synthetic_cache", str(self.synthetic_cache), "--validator.augment_probs", args.augment_probs,
            *self._seed_flag("validator"),
        ]
        child = self._start(Child("validator", "validator", argv, self.logs / "validator.log"))
        self._wait(lambda: self._read_state() is not None, "the validator's first scored challenge", child)

    def _seed_flag(self, section: str) -> list[str]:
        return [] if self.args.seed is None else [f"--{section}.seed", str(self.args.seed)]

    def _start(self, child: Child) -> Child:
        self.supervisor.start(child)
        self.console.event(f"started {child.name} (pid {child.pid}); log {child.log_path}")
        self._write_status()
        return child

    def _write_status(self) -> None:
        """`localnet.json`: what is running where, for scripts and tests (rewritten atomically)."""
        status = {
            "pid": os.getpid(),
            "workdir": str(self.workdir),
            "chain": str(self.chain_path),
            "netuid": NETUID,
            "validator": {"hotkey": self.validator_hotkey, "state_dir": str(self.validator_state)},
            "children": [
                {"name": child.name, "role": child.role, "pid": child.pid, "log": str(child.log_path),
                 "argv": child.argv, **child.extra}
                for child in self.supervisor.children
            ],
        }
        atomic_write_bytes(self.workdir / STATUS_FILE, json.dumps(status, indent=2).encode())

    # ---- running --------------------------------------------------------------------------------------------
    def _wait(self, ready: Callable[[], bool], what: str, *children: Child) -> None:
        """Poll `ready` while watching every child; time out after --startup-timeout with the children's logs."""
        deadline = time.monotonic() + self.args.startup_timeout
        while not ready():
            self._check_children()
            if time.monotonic() > deadline:
                tails = "\n".join(f"  {child.name} ({child.log_path}):\n{child.log_tail()}" for child in children)
                raise LocalnetError(f"timed out after {self.args.startup_timeout:g} s waiting for {what}\n{tails}")
            time.sleep(POLL_S)

    def _check_children(self) -> None:
        for child, code in self.supervisor.exited():
            if child.role == "miner" and self.args.tolerate_miner_exit:
                self.console.event(
                    f"{child.name} (uid {child.extra['uid']}) exited with code {code}; it stays registered and "
                    "scores 0 from now on (--tolerate-miner-exit)"
                )
                continue
            raise LocalnetError(
                f"{child.name} (pid {child.pid}) exited with code {code}; stopping the local subnet. "
                f"Last lines of {child.log_path}:\n{child.log_tail()}"
            )

    def _read_state(self) -> ValidatorState | None:
        return read_validator_state(self.validator_state, NETUID)

    def leaderboard(self) -> Leaderboard:
        weights = self.chain.get_weights(self.validator_hotkey) if self.chain and self.validator_hotkey else {}
        return build_leaderboard(self._read_state(), weights, self.miners)

    def _watch(self) -> None:
        """Once a second: check the children, redraw the board when the validator's step count moved, stop after
        --rounds steps (the final board is drawn by the caller)."""
        shown = -1
        while True:
            self._check_children()
            board = self.leaderboard()
            if self.args.rounds and board.rounds >= self.args.rounds:
                self.console.event(f"{board.rounds} rounds done")
                return
            if board.rounds != shown:
                shown = board.rounds
                self.console.board(self.render(board))
            time.sleep(1.0)

    def render(self, board: Leaderboard) -> str:
        last = self.chain.last_weights_block(self.validator_hotkey)
        target = f"/{self.args.rounds}" if self.args.rounds else ""
        weights = f"weights set at block {last}" if last is not None else "no weights set yet"
        return board.render(f"round {board.rounds}{target} | block {self.chain.block()} | {weights}")


# ---------------------------------------------------------------------------------------------------- entry point
def _raise_interrupted(signum: int, _frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not abort the shutdown half-way
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Run the local subnet; 0 after the last round, 1 when it could not start or a child died, 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    console = Console(sys.stdout)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    net = None
    code = 1
    try:
        net = Localnet(args, console)
        code = net.run()
    except Interrupted as stop:
        console.event(f"{stop} received: stopping")
        code = 130
    except (LocalnetError, ChainError) as exc:
        console.event(f"ERROR: {exc}")
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if net is not None:
            try:
                net.stop()
                if not _finish(net, args, console):
                    code = code or 1
            finally:
                net.close()
                console.event("work folder removed" if net.remove_workdir else f"files kept in {net.workdir}")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _finish(net: Localnet, args: argparse.Namespace, console: Console) -> bool:
    """Final leaderboard, and the summary file when asked (also after a failure: it records what happened).
    False when the summary cannot be written."""
    if net.chain is None:
        return True
    board = net.leaderboard()
    if board.rounds:
        console.board(net.render(board).replace("round", "final: round", 1))
    if args.summary is None:
        return True
    path = args.summary.expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(board.summary(), indent=2) + "\n")
    except OSError as exc:
        console.event(f"ERROR: cannot write the summary {path}: {exc}")
        return False
    console.event(f"summary written to {path}")
    return True


if __name__ == "__main__":
    sys.exit(main())
