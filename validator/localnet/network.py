"""One run of the local subnet: the work folder, the chain and the children.

Why this order: the miners start first and the validator only once each one serves its axon, so no miner is scored
before it can answer; the +index miners wait for their index, built meanwhile. Every child runs in its own session
with its output in `<workdir>/logs`; `stop` ends the validator first, then every other child (SIGTERM, then
SIGKILL), so no process is left behind. `<workdir>/localnet.json` lists the children with their pids, uids and
hotkeys for scripts and tests.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from base_miner.retrieval.index import MANIFEST as INDEX_MANIFEST
from bitmind.atomic import atomic_write_bytes
from bitmind.chain.local import LocalChain
from bitmind.console import Console
from bitmind.dev_wallets import make_wallet
from bitmind.ports import free_ports, port_answers
from bitmind.supervisor import STOP_GRACE_S, Child, Supervisor
from validator.challenges.dataset_spec import packaged_real_sample
from validator.challenges.synthetic_seed import (
    IMAGE_SUFFIXES,
    SampleError,
    packaged_synthetic_sample,
    seed_semi_synthetic_cache,
    seed_synthetic_cache,
)
from validator.leaderboard import Leaderboard, MinerInfo, build_leaderboard, read_validator_state
from validator.localnet.errors import LocalnetError
from validator.localnet.flags import SEMI_MIX, SEMI_SEED_ITEMS, VIDEO_SEED_CLIPS
from validator.localnet.miners import parse_miners
from validator.localnet.report import board_text, write_summary
from validator.state import ValidatorState
from validator.video.sources import VideoClipSource

NETUID = 34
INDEX_CALIBRATION_IMAGES = 60  # indexed images challenged at each level to fit the demo index's match rule
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


def _project_root() -> Path:
    return Path(__file__).resolve().parents[2]


class Localnet:
    """Owns the work folder, the chain and the children for one run."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.miner_specs = parse_miners(args.miners)
        if args.fake_sample is not None and not args.fake_sample.is_dir():
            raise LocalnetError(f"--fake-sample {args.fake_sample} is not a folder")
        self.fake_sample = args.fake_sample or packaged_synthetic_sample()
        self.video_data = (args.video_data or _project_root().parent / "shared" / "data" / "video").expanduser().resolve()
        if args.video_share > 0 and not (self.video_data / "metadata.csv").is_file():
            raise LocalnetError(
                f"--video-share {args.video_share:g} needs clips: {self.video_data}/metadata.csv not found (give "
                "--video-data a folder of clips with a metadata.csv of path,label rows, or --video-share 0)"
            )
        self.synthetic_video_cache: Path | None = None
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
        self.index_dir = args.index.expanduser().resolve() if args.index else self.workdir / "index"
        self.index_builder: Child | None = None
        self.index_miners: list[Child] = []  # started once the index is built
        self.chain_path = self.workdir / "chain.sqlite"
        self.wallets = self.workdir / "wallets"
        self.synthetic_cache = self.workdir / "synthetic_cache"
        self.semi_cache = self.workdir / "semi_synthetic_cache"
        self.validator_state = self.workdir / "validator"
        env = {**CHILD_THREADS, **os.environ, **CHILD_ENV, "HF_HOME": str(self.workdir / "hf_home")}
        # Caches too stay in the work folder: the miners' exported ONNX trunks (BITMIND_CACHE_DIR defaults under it)
        # and the device id ONNX Runtime writes when it is imported.
        env["XDG_CACHE_HOME"] = str(self.workdir / "cache")
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
        if self.index_miners:
            self._phase("retrieval index", self._start_index_miners)
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
        if self.args.semi_synthetic:
            real = Path(packaged_real_sample().path)
            try:
                count = seed_semi_synthetic_cache(
                    self.semi_cache, real, self.fake_sample, SEMI_SEED_ITEMS, seed=self.args.seed or 0
                )
            except SampleError as exc:
                raise LocalnetError(str(exc)) from None
            self.console.event(f"semi-synthetic cache seeded with {count} spliced images ({real} + {self.fake_sample})")
        if self.args.video_share > 0:
            self._seed_video_cache()

    def _seed_video_cache(self) -> None:
        """Cache generated clips of --video-data where the validator reads the generator's clips (the demo has no
        text-to-video model that makes anything but noise on a CPU)."""
        source = VideoClipSource([f"{self.video_data}?labels=1"], self.workdir / "synthetic_video", label=1,
                                 fill_batch=VIDEO_SEED_CLIPS, items_per_source=VIDEO_SEED_CLIPS,
                                 seed=self.args.seed or 0)
        count = source.fill_round()
        if not count:
            raise LocalnetError(f"no generated clip of {self.video_data} could be read: {source.status()}")
        self.synthetic_video_cache = next(iter(source.caches.values())).root
        self.console.event(f"generated-clip cache seeded with {count} clips from {self.video_data}")

    def _start_miners(self) -> None:
        """Every miner but the +index ones, which wait for the index (`_start_index_miners`); its build starts first."""
        if any(spec.with_index for spec in self.miner_specs):
            self._start_index_build()
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
            if spec.with_index:
                argv += ["--miner.index", str(self.index_dir)]
            argv += ["--neuron.video_detector", self.args.video_detector if self.args.video_share else "none"]
            extra = {"uid": info.uid, "hotkey": info.hotkey, "detector": spec.label, "port": port}
            child = Child(name, "miner", argv, self.logs / f"{name}.log", extra)
            if spec.with_index:
                self.index_miners.append(child)
            else:
                self._start(child)

    def _start_index_build(self) -> None:
        """Reuse a complete index at `index_dir`, or build one there in a child (resuming an unfinished build) from
        the packaged real sample, the AI-generated sample serving as the match rule's negatives."""
        if (self.index_dir / INDEX_MANIFEST).is_file():  # the miner checks it at start-up and names any fault
            self.console.event(f"retrieval index {self.index_dir}: reused")
            return
        if self.fake_sample is None:
            raise LocalnetError("+index miners need AI-generated images to fit the index's match rule: --fake-sample")
        data = self.workdir / "index_data"  # an imagefolder: real/ is indexed, fake/ gives the negatives
        for label, folder in (("real", Path(packaged_real_sample().path)), ("fake", self.fake_sample)):
            (data / label).mkdir(parents=True, exist_ok=True)
            for image in folder.iterdir():
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    shutil.copyfile(image, data / label / image.name)
        argv = [
            sys.executable, "-m", "base_miner.retrieval.cli", "build", "--dataset", str(data),
            "--out", str(self.index_dir), "--threads", "1", "--calibration-images", str(INDEX_CALIBRATION_IMAGES),
        ]
        self.index_builder = self._start(
            Child("build-index", "setup", argv, self.logs / "build-index.log", one_shot=True)
        )

    def _start_index_miners(self) -> None:
        builder = self.index_builder
        if builder is not None:
            self._wait(lambda: builder.exit_code() == 0, f"the retrieval index {self.index_dir} to be built", builder)
            self.console.event(f"retrieval index {self.index_dir} built")
        for child in self.index_miners:
            self._start(child)

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
            "--validator.semi_synthetic_cache", str(self.semi_cache) if args.semi_synthetic else "",
            *(["--challenge.probs", SEMI_MIX] if args.semi_synthetic else []),
            "--validator.video_share", str(args.video_share),
            # the validator stops itself after --rounds steps, so the board ends at exactly that many
            *(["--neuron.max_steps", str(args.rounds)] if args.rounds else []),
            *self._video_flags(),
            *self._seed_flag("validator"),
        ]
        child = self._start(Child("validator", "validator", argv, self.logs / "validator.log"))
        self._wait(lambda: self._read_state() is not None, "the validator's first scored challenge", child)

    def _video_flags(self) -> list[str]:
        if not self.args.video_share:
            return []
        return [
            "--validator.real_video_datasets", f"{self.video_data}?labels=0",
            "--validator.real_video_cache", str(self.workdir / "validator_real_video"),
            "--validator.synthetic_video_cache", str(self.synthetic_video_cache),
        ]

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
            if child.role == "validator" and code == 0 and self._rounds_done(self.leaderboard()):
                continue  # it stopped after --rounds steps (--neuron.max_steps), as asked
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
            if self._rounds_done(board):
                self.console.event(f"{board.rounds} rounds done")
                return
            if board.rounds != shown:
                shown = board.rounds
                self.console.board(self.render(board))
            time.sleep(1.0)

    def _rounds_done(self, board: Leaderboard) -> bool:
        return bool(self.args.rounds) and board.rounds >= self.args.rounds

    def render(self, board: Leaderboard) -> str:
        """The board under a header with the round, the chain's block and the validator's last weights."""
        last = self.chain.last_weights_block(self.validator_hotkey)
        target = f"/{self.args.rounds}" if self.args.rounds else ""
        weights = f"weights set at block {last}" if last is not None else "no weights set yet"
        return board_text(board, f"round {board.rounds}{target} | block {self.chain.block()} | {weights}",
                          self.validator_state)

    def finish(self) -> bool:
        """Final leaderboard, and the summary file when asked (also after a failure: it records what happened).
        False when the summary cannot be written."""
        if self.chain is None:
            return True
        board = self.leaderboard()
        if board.rounds:
            self.console.board(self.render(board).replace("round", "final: round", 1))
        if self.args.summary is None:
            return True
        path = self.args.summary.expanduser()
        try:
            write_summary(path, board, self.validator_state)
        except OSError as exc:
            self.console.event(f"ERROR: cannot write the summary {path}: {exc}")
            return False
        self.console.event(f"summary written to {path}")
        return True
