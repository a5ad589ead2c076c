"""Benchmark: the local subnet left running unattended — does any process grow?

Starts `bitmind-localnet --rounds 0` (a local chain, the miners, a validator and a generator on 127.0.0.1, on the
CPU) and samples every process it started every `--interval` seconds for `--minutes`: resident memory (the
process with its own children), open file descriptors, threads, CPU, the validator's scored rounds from its state
file, and the disk its work folder (logs, caches, state) takes. Memory that keeps rising after the warm-up (caches
filled, every miner's 100-answer window full) is what would take a node down over a week; so are descriptors,
threads or disk that keep rising. Prints, per process, memory after the warm-up and at the end, its peak, and the
slope of a line fitted to the samples after the warm-up (MiB per hour), with descriptors and threads at both ends;
writes every sample to `soak.csv` and a picture of memory over time to `soak.png` in `--out`. Then ends the network
with Ctrl-C (SIGINT) as an operator would and reports how long it took to stop and with which exit code.

    python benchmarks/soak.py --minutes 60 --out runs/soak [-- --miners camo,npr,baseline]

Flags after `--` go to `bitmind-localnet` unchanged (its own `--rounds` and `--workdir` are set here).
"""

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from validator.leaderboard import read_validator_state
from validator.localnet.network import STATUS_FILE

STOP_GRACE_S = 90.0
CLEAN_EXITS = (0, 130)  # 130: the shell's code for a program that ended on SIGINT, which localnet uses for Ctrl-C


@dataclass
class Series:
    """One process's samples: seconds since the first sample, MiB (resident, or on disk for a folder), descriptors,
    threads, CPU seconds."""

    name: str
    t: list[float] = field(default_factory=list)
    mib: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="How long to sample after the validator runs.")
    parser.add_argument("--warmup", type=float, default=None,
                        help="Minutes at the start left out of the memory slope (caches and windows filling); "
                        "default a quarter of --minutes, at most 5.")
    parser.add_argument("--interval", type=float, default=10.0, help="Seconds between samples.")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"),
                        help="New or empty folder for soak.csv, soak.png, localnet.log and the network's work folder.")
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="Seconds to wait for the validator's first state file before giving up.")
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.warmup is None:
        args.warmup = min(5.0, args.minutes / 4)
    if args.minutes <= 0 or args.interval <= 0 or not 0 <= args.warmup < args.minutes:
        parser.error("--minutes and --interval must be positive and --warmup in [0, --minutes)")
    for flag in ("--rounds", "--workdir"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in passthrough):
            parser.error(f"{flag} is set by the soak itself")
    return args, passthrough


def _sample(pid: int, children: bool = True) -> tuple[float, int, int, float] | None:
    """MiB resident, descriptors, threads and CPU seconds of a process with (or without) its descendants; None once
    it is gone or has finished (a zombie: e.g. a one-off build)."""
    try:
        root = psutil.Process(pid)
        if root.status() == psutil.STATUS_ZOMBIE:
            return None
        procs = [root, *(root.children(recursive=True) if children else [])]
    except psutil.NoSuchProcess:
        return None
    rss = fds = threads = 0
    cpu = 0.0
    for proc in procs:
        try:
            with proc.oneshot():
                rss += proc.memory_info().rss
                fds += proc.num_fds()
                threads += proc.num_threads()
                times = proc.cpu_times()
                cpu += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return rss / 2**20, fds, threads, cpu


def _status(workdir: Path) -> dict:
    """What localnet publishes about its run (children, the validator's state folder, netuid); {} before it does."""
    try:
        return json.loads((workdir / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _rounds(status: dict) -> int | None:
    if "validator" not in status:
        return None
    state = read_validator_state(status["validator"]["state_dir"], status["netuid"])
    return state.scorer.step if state is not None else None


def _folder_mib(folder: Path) -> float:
    """Disk used by the files under `folder` (logs, caches, state): what a week of running leaves behind."""
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:  # removed while walked (atomic writes' temporary files)
            continue
    return total / 2**20


def _slope_per_hour(series: Series, warmup_s: float) -> float:
    t = np.asarray(series.t)
    keep = t >= warmup_s
    if keep.sum() < 3:
        return float("nan")
    return float(np.polyfit(t[keep] / 3600.0, np.asarray(series.mib)[keep], 1)[0])


def _at(values: list, t: list[float], when: float):
    """The first sample at or after `when` (the last one if none)."""
    for value, at in zip(values, t):
        if at >= when:
            return value
    return values[-1]


def _report(
    series: dict[str, Series], warmup_s: float, rounds: list[tuple[float, int]], disk: dict[str, Series]
) -> str:
    lines = [f"{'process':<28} {'MiB warm':>9} {'MiB end':>8} {'peak':>7} {'MiB/h':>7} {'fds':>9} {'threads':>9} {'CPU %':>6}"]
    for name, s in series.items():
        if not s.t:
            continue
        span = s.t[-1] - s.t[0]
        cpu_pct = 100 * (s.cpu[-1] - s.cpu[0]) / span if span > 0 else float("nan")
        lines.append(
            f"{name:<28} {_at(s.mib, s.t, warmup_s):>9.0f} {s.mib[-1]:>8.0f} {max(s.mib):>7.0f} "
            f"{_slope_per_hour(s, warmup_s):>+7.1f} {_at(s.fds, s.t, warmup_s):>4}→{s.fds[-1]:<4} "
            f"{_at(s.threads, s.t, warmup_s):>4}→{s.threads[-1]:<4} {cpu_pct:>6.0f}"
        )
    for name, d in disk.items():
        lines.append(f"disk, {name}: {d.mib[0]:.1f} → {d.mib[-1]:.1f} MiB ({_slope_per_hour(d, warmup_s):+.1f} MiB/h after the warm-up)")
    if len(rounds) >= 2:
        (t0, r0), (t1, r1) = rounds[0], rounds[-1]
        lines.append(f"validator: {r1} rounds scored, {60 * (r1 - r0) / max(t1 - t0, 1e-9):.1f} per minute while sampled")
    return "\n".join(lines)


def _plot(series: dict[str, Series], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, s in series.items():
        ax.plot(np.asarray(s.t) / 60, s.mib, label=name)
    ax.axvline(warmup_s / 60, color="grey", linestyle="--", linewidth=1, label="end of warm-up")
    ax.set_xlabel("minutes since the validator's first round")
    ax.set_ylabel("resident memory, MiB (process and its children)")
    ax.set_title("local subnet left running: memory per process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stop(proc: subprocess.Popen) -> tuple[int | None, float]:
    """Ctrl-C as an operator would; SIGKILL the group only if it does not stop within the grace period."""
    started = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, time.monotonic() - started
    return proc.returncode, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    out = args.out.expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} must be an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "workdir"
    command = [sys.executable, "-m", "neurons.localnet", "--rounds", "0", "--workdir", str(workdir), *passthrough]
    log = (out / "localnet.log").open("wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"started {' '.join(command)} (pid {proc.pid}); its output: {out / 'localnet.log'}", flush=True)
    series: dict[str, Series] = {}
    rounds: list[tuple[float, int]] = []
    disk = {"work folder": Series("work folder"), "its logs": Series("its logs")}
    code = 1
    try:
        deadline = time.monotonic() + args.startup_timeout
        while _rounds(_status(workdir)) is None:
            if proc.poll() is not None:
                raise SystemExit(f"bitmind-localnet exited with {proc.returncode} during start-up; see {out / 'localnet.log'}")
            if time.monotonic() > deadline:
                raise SystemExit(f"no validator round within {args.startup_timeout:.0f} s; see {out / 'localnet.log'}")
            time.sleep(2)
        print(f"validator running; sampling every {args.interval:g} s for {args.minutes:g} min", flush=True)
        t0 = time.monotonic()
        end = t0 + 60 * args.minutes
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise SystemExit(f"bitmind-localnet exited with {proc.returncode} while sampled; see {out / 'localnet.log'}")
            now = time.monotonic() - t0
            status = _status(workdir)
            children = {child["name"]: int(child["pid"]) for child in status.get("children", [])}
            # localnet alone: its descendants are the children, sampled on their own
            for name, pid in {"localnet": proc.pid, **children}.items():
                sample = _sample(pid, children=name != "localnet")
                if sample is None:
                    continue
                s = series.setdefault(name, Series(name))
                s.t.append(now)
                for values, value in zip((s.mib, s.fds, s.threads, s.cpu), sample):
                    values.append(value)
            for d, folder in zip(disk.values(), (workdir, workdir / "logs")):
                d.t.append(now)
                d.mib.append(_folder_mib(folder))
            done = _rounds(status)
            if done is not None:
                rounds.append((now, done))
            print(f"{now / 60:6.1f} min: {done} rounds; " + ", ".join(f"{n} {s.mib[-1]:.0f} MiB" for n, s in series.items() if s.t),
                  flush=True)
            time.sleep(args.interval)
        code = 0
    finally:
        stopped, took = _stop(proc)
        log.close()
        print(f"Ctrl-C: bitmind-localnet stopped in {took:.1f} s with exit code {stopped}"
              + ("" if stopped is not None else " (killed after the grace period)"), flush=True)
        if series:
            warmup_s = 60 * args.warmup
            with (out / "soak.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["process", "seconds", "rss_mib", "fds", "threads", "cpu_s"])
                for s in series.values():
                    writer.writerows([s.name, *row] for row in zip(s.t, s.mib, s.fds, s.threads, s.cpu))
            _plot(series, warmup_s, out / "soak.png")
            print(_report(series, warmup_s, rounds, disk))
            print(f"samples: {out / 'soak.csv'}; picture: {out / 'soak.png'}")
        if stopped not in CLEAN_EXITS:
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
