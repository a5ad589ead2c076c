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

It prints a leaderboard as the validator's step count advances and stops after `--rounds` steps or Ctrl-C;
whatever ends the run (the last round, Ctrl-C, SIGTERM, a child that dies, an error here), every child is stopped.
This file is the wiring only: flags, the run and the board live in `validator/localnet/`.
"""

import os
import signal
import sys

os.environ.setdefault("READ_ONLY", "1")  # before bittensor is imported: the orchestrator writes nothing home

from bitmind.chain.base import ChainError  # noqa: E402
from bitmind.console import Console  # noqa: E402
from validator.localnet.errors import LocalnetError  # noqa: E402
from validator.localnet.flags import build_parser  # noqa: E402
from validator.localnet.network import Localnet  # noqa: E402

__all__ = ["build_parser", "main"]


class Interrupted(Exception):
    """SIGINT / SIGTERM / SIGHUP reached the orchestrator."""


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
                if not net.finish():
                    code = code or 1
            finally:
                net.close()
                console.event("work folder removed" if net.remove_workdir else f"files kept in {net.workdir}")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
