"""bitmind-localnet: a whole subnet on this machine (CPU only, offline) in one command.

Why: an operator should see miners, a validator and the generator work together, and how scores and weights
separate a trained detector from a poor one, before registering on subnet 34. Everything runs as separate real
processes on 127.0.0.1, exactly the commands an operator would run, sharing a LocalChain SQLite file:

    chain + wallets (uid 0: the validator, with stake; uids 1..N: miners)
    miners    python -m neurons.miner     --neuron.detector camo | npr | baseline | ...
              (camo+index: CAMO with --miner.index, an index of the real sample built at start by bitmind-index)
    generator python -m neurons.generator a tiny random Stable Diffusion pipeline built at start
    validator python -m neurons.validator real images: the package's sample; fakes: the packaged AI-generated
                                          sample seeded into the synthetic cache, plus the generator's images;
                                          with --semi-synthetic also real images with a pasted generated region;
                                          with --video-share also clips: real and generated ones from the shared
                                          clip folder (--video-data), scored per modality

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
from base_miner.retrieval.index import MANIFEST as INDEX_MANIFEST  # noqa: E402
from bitmind.atomic import atomic_write_bytes  # noqa: E402
from bitmind.chain.base import ChainError  # noqa: E402
from bitmind.chain.local import LocalChain  # noqa: E402
from bitmind.console import Console  # noqa: E402
from bitmind.dev_wallets import make_wallet  # noqa: E402
from bitmind.ports import free_ports, port_answers  # noqa: E402
from bitmind.supervisor import STOP_GRACE_S, Child, Supervisor  # noqa: E402
from validator.leaderboard import (  # noqa: E402
    Leaderboard,
    MinerInfo,
    build_leaderboard,
    read_validator_state,
)
from validator.challenges.dataset_spec import packaged_real_sample  # noqa: E402
from validator.challenges.mix import KINDS  # noqa: E402
from validator.challenges.synthetic_seed import (  # noqa: E402
    IMAGE_SUFFIXES,
    SampleError,
    packaged_synthetic_sample,
    seed_semi_synthetic_cache,
    seed_synthetic_cache,
)
from validator.state import ValidatorState  # noqa: E402
from validator.video.sources import VideoClipSource  # noqa: E402

__all__ = ["LocalnetError", "build_parser", "main"]

NETUID = 34
# camo_thumbnails: CAMO with the route for the up-scaled 32² samples this demo's validator sends (camo answers
# them near chance; see base_miner/configs/camo_thumbnails.yaml)
DEFAULT_MINERS = "camo_thumbnails,npr,baseline"
DEFAULT_AUGMENT_PROBS = "0:0.5,1:0.5"
INDEX_SUFFIX = "+index"  # a --miners entry CONFIG+index serves CAMO with a retrieval index of the real sample
INDEX_CALIBRATION_IMAGES = 60  # indexed images challenged at each level to fit the demo index's match rule
DEFAULT_ROUNDS = 40  # EMA scores (alpha 0.05) reach 87 % of their steady value: the ranking has settled
MAX_MINERS = 16
VALIDATOR_NAME = "localnet-validator"
VALIDATOR_STAKE = 1000.0
LOOPBACK = "127.0.0.1"
STATUS_FILE = "localnet.json"
SEMI_SEED_ITEMS = 60  # spliced semi-synthetic items seeded with --semi-synthetic
SEMI_MIX = "0.5,0.25,0.25"  # real, synthetic, semi-synthetic challenges with --semi-synthetic
VIDEO_SEED_CLIPS = 40  # generated clips of --video-data cached for the validator at start with --video-share
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


def _video_share(text: str) -> float:
    value = _number(float, 0, strict=False)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


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
        "baseline_random) or detector YAML files; one miner process each. A CAMO entry with the suffix +index "
        "(camo+index) also looks challenges up in a retrieval index of the validator's real sample (see --index).",
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
        default=DEFAULT_AUGMENT_PROBS,
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
        "--index",
        type=Path,
        default=None,
        help="Retrieval index folder of the +index miners: reused when it holds a complete index, otherwise built "
        "there at start (bitmind-index build) from the packaged real sample, with the AI-generated sample as the "
        "match rule's negatives (default: built in the work folder).",
    )
    parser.add_argument(
        "--semi-synthetic",
        action="store_true",
        help=f"Also send semi-synthetic challenges (mix {SEMI_MIX} of real, synthetic, semi-synthetic): real sample "
        f"images with a region of an AI-generated sample image pasted in through a soft mask ({SEMI_SEED_ITEMS} "
        "made at start; the demo has no inpainting model). The board shows accuracy per kind.",
    )
    parser.add_argument(
        "--video-share",
        type=_video_share,
        default=0.0,
        help="Share of challenges that are video clips (and the video weight of the reward), from --video-data: "
        f"its real clips are the validator's real videos, {VIDEO_SEED_CLIPS} of its generated clips seed the "
        "generated-clip cache. Miners answer with their video detector. 0: images only.",
    )
    parser.add_argument(
        "--video-detector",
        default="tall",
        help="Video detector every miner serves with --video-share (--neuron.video_detector: a packaged config name, "
        "a YAML file, or none to answer clips with -1); without --video-share miners load none.",
    )
    parser.add_argument(
        "--video-data",
        type=Path,
        default=None,
        help="Folder of clips with a metadata.csv (path and label columns, 0 real / 1 generated) for --video-share "
        "(default: shared/data/video beside the project folder).",
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
    with_index: bool = False  # serve with --miner.index (the entry ended in INDEX_SUFFIX)


def parse_miners(text: str) -> list[MinerSpec]:
    """`camo+index,npr,baseline` -> miner specs; every entry must name a packaged detector config or a YAML file
    (a CAMO one when it ends in +index)."""
    entries = [part.strip() for part in text.split(",")]
    if not entries or any(not entry for entry in entries):
        raise LocalnetError(f"--miners must be a comma list of detector names, got {text!r}")
    if len(entries) > MAX_MINERS:
        raise LocalnetError(f"--miners lists {len(entries)} miners; at most {MAX_MINERS} run on one machine")
    specs = []
    for index, entry in enumerate(entries, start=1):
        with_index = entry.endswith(INDEX_SUFFIX)
        if with_index:
            entry = entry[: -len(INDEX_SUFFIX)]
        try:
            detector = load_config(entry).get("detector")
        except ConfigError as exc:
            raise LocalnetError(f"--miners entry {index} ({entry!r}): {exc}") from None
        if with_index and detector != "CAMO":
            raise LocalnetError(f"--miners entry {index}: {INDEX_SUFFIX} needs a CAMO config; {entry!r} is {detector}")
        path = Path(entry).expanduser()
        if path.exists():  # a YAML file: the miner runs in the work folder, so hand it an absolute path
            entry, label = str(path.resolve()), path.stem
        else:
            label = entry
        label += INDEX_SUFFIX if with_index else ""
        specs.append(MinerSpec(index, entry, label, f"localnet-miner{index}", with_index))
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

    def kind_stats(self, key: str = "kinds") -> dict[str, Any]:
        """The validator's rolling accuracy (and mask IoU) per challenge kind, from its heartbeat (`video_kinds`:
        of the clip challenges); {} before one."""
        try:
            beat = json.loads((self.validator_state / "heartbeat.json").read_text())
        except (OSError, ValueError):
            return {}
        kinds = beat.get(key) if isinstance(beat, dict) else None
        return kinds if isinstance(kinds, dict) else {}

    def render(self, board: Leaderboard) -> str:
        last = self.chain.last_weights_block(self.validator_hotkey)
        target = f"/{self.args.rounds}" if self.args.rounds else ""
        weights = f"weights set at block {last}" if last is not None else "no weights set yet"
        text = board.render(f"round {board.rounds}{target} | block {self.chain.block()} | {weights}")
        by_kind = kind_line(self.kind_stats())
        video = self.kind_stats("video_kinds")
        clips = [f"{kind} {row['accuracy']:.2f} ({row['challenges']} clips)" for kind, row in video.items()
                 if isinstance(row, dict) and row.get("challenges") and isinstance(row.get("accuracy"), (int, float))]
        text += f"\n{by_kind}" if by_kind else ""
        return text + ("\nminers' accuracy on clips by kind: " + ", ".join(clips) if clips else "")


def kind_line(kinds: dict[str, Any]) -> str:
    """`miners' accuracy by kind: real 0.91 (20 challenges), ...` from the validator heartbeat's `kinds`; "" while
    no challenge has been scored."""
    shown = []
    for kind in KINDS:
        row = kinds.get(kind)
        if isinstance(row, dict) and isinstance(row.get("challenges"), int) and row["challenges"] > 0:
            accuracy = row.get("accuracy")
            figure = f"{accuracy:.2f}" if isinstance(accuracy, (int, float)) else "-"
            shown.append(f"{kind} {figure} ({row['challenges']} challenges)")
    return "miners' accuracy by kind: " + ", ".join(shown) if shown else ""


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
        summary = {**board.summary(), "kinds": net.kind_stats(), "video_kinds": net.kind_stats("video_kinds")}
        path.write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        console.event(f"ERROR: cannot write the summary {path}: {exc}")
        return False
    console.event(f"summary written to {path}")
    return True


if __name__ == "__main__":
    sys.exit(main())
