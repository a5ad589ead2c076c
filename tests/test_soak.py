"""The soak benchmark's own parts: flag refusals, and a process tree's sample (children counted, finished or gone
processes skipped rather than read as 0 MiB or crashing the run). The soak itself is a benchmark, not a test."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--minutes", "0"], "--minutes and --interval must be positive"),
        (["--minutes", "5", "--warmup", "5"], "--warmup in [0, --minutes)"),
        (["--interval", "-1"], "--minutes and --interval must be positive"),
        (["--", "--rounds", "3"], "--rounds is set by the soak itself"),
        (["--", "--workdir=/tmp/x"], "--workdir is set by the soak itself"),
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        soak.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_after_the_separator_reach_localnet_unchanged():
    args, passthrough = soak.parse_args(["--minutes", "2", "--", "--miners", "camo,npr", "--seed", "3"])
    assert args.minutes == 2 and args.warmup == 0.5 and passthrough == ["--miners", "camo,npr", "--seed", "3"]


def test_a_non_empty_out_folder_is_refused_before_anything_starts(tmp_path):
    (tmp_path / "old.csv").write_text("x")
    with pytest.raises(SystemExit, match="must be an empty or new folder"):
        soak.main(["--minutes", "1", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.csv"]


def test_a_process_tree_is_sampled_with_its_children_and_skipped_once_finished():
    code = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while len(soak.psutil.Process(parent.pid).children()) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = soak._sample(parent.pid)
        alone = soak._sample(parent.pid, children=False)
        assert tree is not None and alone is not None
        assert tree[0] > alone[0] > 1  # MiB: the child's memory is counted too
        assert tree[2] >= alone[2] + 1  # threads of both
    finally:
        for child in soak.psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
    deadline = time.monotonic() + 20
    while soak.psutil.Process(parent.pid).status() != soak.psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert soak._sample(parent.pid) is None  # killed, not yet reaped: a zombie, skipped
    parent.wait()
    assert soak._sample(parent.pid) is None and soak._sample(parent.pid, children=False) is None  # gone


def test_memory_slope_ignores_the_warm_up_and_needs_three_samples():
    series = soak.Series("x", t=[0, 60, 120, 180, 240], mib=[100, 500, 500, 501, 502])
    assert soak._slope_per_hour(series, warmup_s=100) == pytest.approx(60.0)  # 1 MiB a minute after warm-up
    assert np.isnan(soak._slope_per_hour(series, warmup_s=200))
