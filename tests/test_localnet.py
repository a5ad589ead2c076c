"""bitmind-localnet: flags and set-up errors, the leaderboard, child supervision, the crash path, and (slow) a whole
local subnet with a miner killed mid-run."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bitmind.console import Console
from bitmind.supervisor import Child, Supervisor
from neurons.localnet import main
from validator.localnet.errors import LocalnetError
from validator.localnet.flags import DEFAULT_MINERS
from validator.localnet.miners import parse_miners
from validator.localnet.network import STATUS_FILE
from validator.localnet.report import board_text, write_summary
from validator.leaderboard import SUMMARY_KEYS, MinerInfo, build_leaderboard, read_validator_state
from validator.challenges.synthetic_seed import FAKE_SAMPLE_MODEL, SampleError, seed_synthetic_cache
from validator.state import STATE_FILENAME, MinerRecordState, ScorerState, ValidatorState

REPO = Path(__file__).resolve().parents[1]
NETUID = 34


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, where /proc shows one, counts as gone: it runs nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _wait_until(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _run_localnet(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "neurons.localnet", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------------- flags
def test_miner_list_is_checked_before_anything_starts(tmp_path, monkeypatch):
    specs = parse_miners("camo, npr,baseline_random")
    assert [(s.index, s.detector, s.label, s.wallet_name) for s in specs] == [
        (1, "camo", "camo", "localnet-miner1"),
        (2, "npr", "npr", "localnet-miner2"),
        (3, "baseline_random", "baseline_random", "localnet-miner3"),
    ]
    custom = tmp_path / "mine.yaml"
    custom.write_text("detector: baseline\nmode: constant\nvalue: 0.7\n")
    monkeypatch.chdir(tmp_path)  # a relative path is handed to the miner as an absolute one (it runs in the work folder)
    (mine,) = parse_miners("mine.yaml")
    assert (mine.label, mine.detector) == ("mine", str(custom))
    for bad, message in [("camo,,npr", "comma list"), ("", "comma list"), ("nosuch", "nosuch"),
                         (str(tmp_path / "missing.yaml"), "does not exist"), (",".join(["baseline"] * 17), "at most")]:
        with pytest.raises(LocalnetError, match=message):
            parse_miners(bad)


@pytest.mark.parametrize("argv", [["--rounds", "-1"], ["--seconds-per-block", "0"], ["--epoch-length", "x"],
                                  ["--startup-timeout", "nan"], ["--no-such-flag"]])
def test_bad_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_setup_fails_fast_with_a_clear_message(tmp_path, capsys):
    assert main(["--miners", "camo,nosuch"]) == 1
    assert "no packaged detector config 'nosuch'" in capsys.readouterr().out
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    assert main(["--workdir", str(busy)]) == 1
    assert "must be an empty or new folder" in capsys.readouterr().out
    assert main(["--fake-sample", str(tmp_path / "nothing")]) == 1
    assert "is not a folder" in capsys.readouterr().out
    assert sorted(p.name for p in busy.iterdir()) == ["something"]  # nothing was written there


def test_seeding_copies_images_with_metadata_and_rejects_bad_samples(tmp_path):
    from PIL import Image

    from validator.challenges.cache import ImageCache

    sample = tmp_path / "sample"
    sample.mkdir()
    for index in range(3):
        Image.new("RGB", (32, 32), (index * 40, 0, 0)).save(sample / f"fake_{index}.jpg")
    (sample / "README.md").write_text("not an image")
    rows = [{"file_name": f"fake_{index}.jpg", "licence": "MIT", "row": index} for index in range(3)]
    (sample / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert seed_synthetic_cache(tmp_path / "cache", sample) == 3
    cache = ImageCache(tmp_path / "cache")
    assert len(cache) == 3
    image, metadata = cache.sample(np.random.default_rng(0))
    assert image.size == (32, 32) and metadata["model"] == FAKE_SAMPLE_MODEL
    assert metadata["sample"] == rows[int(metadata["source_file"][5])]
    (sample / "metadata.jsonl").write_text('{"file_name": "fake_0.jpg"}\n[1, 2]\n')
    with pytest.raises(SampleError, match="line 2"):
        seed_synthetic_cache(tmp_path / "cache1", sample)
    (sample / "metadata.jsonl").unlink()
    (sample / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SampleError, match="broken.png"):
        seed_synthetic_cache(tmp_path / "cache2", sample)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SampleError, match="holds no images"):
        seed_synthetic_cache(tmp_path / "cache3", empty)


# ---------------------------------------------------------------------------------------------------- leaderboard
def _state(step: int, scores: list[float], hotkeys: list[str], miners: dict[str, MinerRecordState]) -> ValidatorState:
    return ValidatorState(netuid=NETUID, scorer=ScorerState(step=step, scores=scores, hotkeys=hotkeys, miners=miners))


def test_leaderboard_joins_state_and_weights_best_first():
    history_good = [(1, 0.9), (0, 0.2), (1, 0.8), (0, 0.1)]  # all right: accuracy 1, MCC 1
    history_flat = [(1, 0.5), (0, 0.5), (1, 0.5), (0, 0.5)]  # says "real" always: accuracy 0.5, MCC 0
    state = _state(
        4,
        [0.0, 0.1, 0.3, 0.05],
        ["hk-validator", "hk-flat", "hk-good", "hk-stale"],
        {
            "hk-flat": MinerRecordState(history=history_flat, queried=5, answered=4),
            "hk-good": MinerRecordState(history=history_good, queried=4, answered=4),
        },
    )
    miners = [MinerInfo(1, "hk-flat", "baseline"), MinerInfo(2, "hk-good", "npr"), MinerInfo(3, "hk-new", "camo")]
    board = build_leaderboard(state, {0: 0.0, 1: 0.25, 2: 0.75}, miners)
    assert board.rounds == 4 and board.weights_set
    assert [row.detector for row in board.rows] == ["npr", "baseline", "camo"]
    good, flat, new = board.rows
    assert (good.accuracy, good.mcc, good.score, good.weight, good.answered) == pytest.approx((1.0, 1.0, 0.3, 0.75, 4))
    assert (flat.accuracy, flat.mcc, flat.queried, flat.weight) == pytest.approx((0.5, 0.0, 5, 0.25))
    # uid 3's hotkey in the state is not the miner's: its figures are not borrowed
    assert (new.score, new.answered, new.weight) == (0.0, 0, 0.0)
    summary = board.summary()
    assert summary["rounds"] == 4
    assert [set(row) for row in summary["miners"]] == [set(SUMMARY_KEYS)] * 3
    json.dumps(summary)  # serialisable as is
    text = board.render("title")
    assert text.splitlines()[0] == "title" and "npr" in text.splitlines()[3] and "0.750" in text


def test_leaderboard_before_the_first_round_and_without_weights():
    board = build_leaderboard(None, {}, [MinerInfo(1, "hk", "npr")])
    assert board.rounds == 0 and not board.weights_set
    assert board.rows[0].score == 0.0
    assert "no weights on chain yet" in board.render()


def test_board_text_and_summary_add_the_validators_per_kind_figures(tmp_path):
    """The terminal board and --summary carry the heartbeat's accuracy per challenge kind and per clip kind; a
    heartbeat that is missing, torn or of the wrong shape adds nothing instead of failing the run."""
    board = build_leaderboard(None, {}, [MinerInfo(1, "hk", "npr")])
    assert board_text(board, "title", tmp_path) == board.render("title")  # no heartbeat yet
    beat = tmp_path / "heartbeat.json"
    beat.write_text(json.dumps({"kinds": {"real": {"challenges": 3, "accuracy": 0.5}},
                                "video_kinds": {"real": {"challenges": 2, "accuracy": 1.0},
                                                "synthetic": {"challenges": 0, "accuracy": None}, "odd": "x"}}))
    assert board_text(board, "title", tmp_path).splitlines()[-2:] == [
        "miners' accuracy by kind: real 0.50 (3 challenges)", "miners' accuracy on clips by kind: real 1.00 (2 clips)"]
    write_summary(tmp_path / "out" / "summary.json", board, tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["kinds"]["real"]["challenges"] == 3 and summary["video_kinds"]["real"]["accuracy"] == 1.0
    for torn in ('{"kinds": {"real"', "[1, 2]", '{"kinds": [1], "video_kinds": "x"}'):
        beat.write_text(torn)
        assert board_text(board, "title", tmp_path) == board.render("title")


def test_state_reader_never_touches_the_validators_files(tmp_path):
    assert read_validator_state(tmp_path, NETUID) is None  # no file yet
    path = tmp_path / STATE_FILENAME
    for content in (b"{not json", b'{"format_version": 1}', b"[]"):
        path.write_bytes(content)
        assert read_validator_state(tmp_path, NETUID) is None
        assert path.read_bytes() == content  # not moved aside: that is the validator's call
    good = _state(2, [0.5], ["hk"], {})
    path.write_text(good.model_dump_json())
    temp = tmp_path / f"{STATE_FILENAME}.abc.tmp"  # a save in flight
    temp.write_text("partial")
    assert read_validator_state(tmp_path, NETUID).scorer.step == 2
    assert read_validator_state(tmp_path, NETUID + 1) is None
    assert temp.exists()


def test_console_prints_each_board_when_not_a_terminal():
    stream = io.StringIO()
    console = Console(stream)
    console.board("board 1")
    console.event("hello")
    console.board("board 2")
    text = stream.getvalue()
    assert "\x1b[" not in text
    assert text.index("board 1") < text.index("hello") < text.index("board 2")


def test_console_redraws_the_board_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    console = Console(stream)
    console.board("line a\nline b")
    console.event("event")
    console.board("line c")
    text = stream.getvalue()
    # the two-line board is erased before the event, redrawn after it, erased again before the next board
    assert text.count("\x1b[2F\x1b[J") == 2
    assert text.rstrip().endswith("line c")


# ---------------------------------------------------------------------------------------------------- supervision
SPAWNER = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
    "print(child.pid, flush=True); time.sleep(120)"
)
STUBBORN = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
    "time.sleep(120)"
)


def test_supervisor_stops_children_grandchildren_and_stubborn_ones(tmp_path):
    supervisor = Supervisor(dict(os.environ), cwd=tmp_path)
    spawner = supervisor.start(Child("spawner", "miner", [sys.executable, "-c", SPAWNER], tmp_path / "spawner.log"))
    stubborn = supervisor.start(Child("stubborn", "miner", [sys.executable, "-c", STUBBORN], tmp_path / "stubborn.log"))
    grandchild = int(_wait_until(lambda: spawner.log_path.read_text().strip(), 30, "the grandchild's pid"))
    _wait_until(lambda: "ready" in stubborn.log_path.read_text(), 30, "the stubborn child")
    assert supervisor.exited() == []
    killed = supervisor.stop_all(grace_s=1.0)
    assert killed == ["stubborn"]
    for pid in (spawner.pid, stubborn.pid, grandchild):
        _wait_until(lambda pid=pid: not _alive(pid), 10, f"pid {pid} to end")
    assert spawner.exit_code() == -signal.SIGTERM and stubborn.exit_code() == -signal.SIGKILL
    assert supervisor.stop_all() == []  # idempotent


def test_supervisor_reports_each_unexpected_exit_once(tmp_path):
    supervisor = Supervisor(dict(os.environ), cwd=tmp_path)
    child = supervisor.start(Child("quick", "miner", [sys.executable, "-c", "print('bye'); raise SystemExit(3)"],
                                   tmp_path / "quick.log"))
    exited = _wait_until(supervisor.exited, 30, "the child to exit")
    assert exited == [(child, 3)]
    assert supervisor.exited() == []
    assert "bye" in child.log_tail()


# ---------------------------------------------------------------------------------------------------- processes
def _status(workdir: Path) -> dict | None:
    try:
        return json.loads((workdir / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def test_a_child_that_dies_at_start_stops_everything(tmp_path):
    """A miner whose detector cannot be built exits at once: the run ends non-zero, naming it, nothing survives."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("detector: no-such-detector\n")
    workdir = tmp_path / "net"
    done = _run_localnet("--miners", f"baseline,{broken}", "--workdir", str(workdir), "--rounds", "3", timeout=240)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "miner2-broken" in done.stdout and "exited with code 1" in done.stdout
    assert "unknown detector 'no-such-detector'" in done.stdout  # the tail of its log
    status = _status(workdir)
    pids = [child["pid"] for child in status["children"]]
    assert {child["name"] for child in status["children"]} >= {"miner1-baseline", "miner2-broken"}
    assert not [pid for pid in pids if _alive(pid)]
    assert "all processes stopped" in done.stdout


def test_a_start_up_phase_that_takes_too_long_is_named_with_its_log(tmp_path):
    workdir = tmp_path / "net"
    done = _run_localnet("--miners", "baseline", "--workdir", str(workdir), "--startup-timeout", "0.5", timeout=240)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "timed out after 0.5 s waiting for the tiny diffusion pipeline to be built" in done.stdout
    assert f"build-tiny-sd ({workdir / 'logs' / 'build-tiny-sd.log'})" in done.stdout
    assert not [child["pid"] for child in _status(workdir)["children"] if _alive(child["pid"])]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_during_start_up_stops_every_child(tmp_path, sig):
    workdir = tmp_path / "net"
    summary = tmp_path / "summary.json"
    orchestrator = subprocess.Popen(
        [sys.executable, "-m", "neurons.localnet", "--miners", "baseline,baseline_random", "--workdir", str(workdir),
         "--summary", str(summary)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    pids: list[int] = []
    try:
        status = _wait_until(
            lambda: (s := _status(workdir)) and len(s["children"]) >= 3 and s, 120, "the miners to be started"
        )
        pids = [child["pid"] for child in status["children"]]
        orchestrator.send_signal(sig)
        out, _ = orchestrator.communicate(timeout=60)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert orchestrator.returncode == 130, out
    assert f"{signal.Signals(sig).name} received: stopping" in out
    assert not [pid for pid in pids if _alive(pid)]
    assert json.loads(summary.read_text())["rounds"] == 0


E2E_MINERS = tuple(DEFAULT_MINERS.split(","))  # the demo's miners as an operator starts it
ROUNDS = 40
KILL_AT = ROUNDS - 5  # late enough that the killed miner's decayed score still tops the baseline's


@pytest.mark.slow
def test_local_subnet_end_to_end_with_a_miner_killed(tmp_path):
    """A short localnet: weights reach the chain, the baseline ends last, a killed miner's score falls while the
    validator goes on, every child keeps its files in the work folder, and no child process outlives the run."""
    from bitmind.chain.local import LocalChain

    workdir = tmp_path / "net"
    home = tmp_path / "home"  # a child writing under ~/.bitmind (a missing --neuron.state_dir) shows up here
    env = {key: value for key, value in os.environ.items() if key not in ("BITMIND_HOME", "BITMIND_CACHE_DIR")}
    env["HOME"] = str(home)
    summary_path = tmp_path / "summary.json"
    output = tmp_path / "localnet.out"
    with output.open("w") as out:
        orchestrator = subprocess.Popen(
            [sys.executable, "-m", "neurons.localnet", "--miners", ",".join(E2E_MINERS), "--rounds", str(ROUNDS),
             "--workdir", str(workdir), "--summary", str(summary_path), "--tolerate-miner-exit",
             "--seconds-per-block", "0.5", "--epoch-length", "4", "--step-interval", "0.3", "--query-timeout", "8",
             "--seed", "7"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    pids: list[int] = []
    try:
        status = _wait_until(
            lambda: (s := _status(workdir)) and any(c["role"] == "validator" for c in s["children"]) and s,
            240, "the validator to start",
        )
        pids = [child["pid"] for child in status["children"]]
        state = _wait_until(
            lambda: (s := read_validator_state(status["validator"]["state_dir"], NETUID)) and s.scorer.step >= KILL_AT
            and s,
            240, f"{KILL_AT} validator steps",
        )
        # kill the best real detector: its score must fall, yet stay above the baseline's
        miners = [child for child in status["children"] if child["role"] == "miner"]
        target = max((c for c in miners if c["detector"] != "baseline"), key=lambda c: state.scorer.scores[c["uid"]])
        os.kill(target["pid"], signal.SIGKILL)
        score_at_kill = state.scorer.scores[target["uid"]]
        answered_at_kill = state.scorer.miners[target["hotkey"]].answered
        assert orchestrator.wait(timeout=240) == 0, output.read_text()
    finally:
        if orchestrator.poll() is None:
            orchestrator.send_signal(signal.SIGINT)
            orchestrator.wait(timeout=60)
        survivors = [pid for pid in pids if _alive(pid)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
    text = output.read_text()
    assert survivors == [], text
    assert f"{target['name']} (uid {target['uid']}) exited" in text

    summary = json.loads(summary_path.read_text())
    assert summary["rounds"] == ROUNDS > KILL_AT  # the validator stops itself there: the board never overshoots
    assert [set(row) for row in summary["miners"]] == [set(SUMMARY_KEYS)] * len(E2E_MINERS)
    by_uid = {row["uid"]: row for row in summary["miners"]}
    assert sorted(row["detector"] for row in summary["miners"]) == sorted(E2E_MINERS)

    # the flags reached the chain and the children
    validator_argv = " ".join(next(c for c in status["children"] if c["role"] == "validator")["argv"])
    generator_argv = " ".join(next(c for c in status["children"] if c["role"] == "generator")["argv"])
    for flag in ("--neuron.epoch_length 4", "--neuron.step_interval 0.3", "--neuron.timeout 8.0",
                 "--validator.seed 7", f"--neuron.sample_size {len(E2E_MINERS)}", f"--neuron.max_steps {ROUNDS}"):
        assert flag in validator_argv
    assert "--generator.seed 7" in generator_argv
    generator_beat = json.loads((workdir / "generator" / "heartbeat.json").read_text())
    assert generator_beat["role"] == "generator" and generator_beat["pid"] in pids
    validator_beat = json.loads((workdir / "validator" / "heartbeat.json").read_text())
    assert validator_beat["synthetic_cached"] > 0  # the seeded sample, plus whatever the generator added
    assert not (home / ".bitmind").exists() and not (home / ".cache").exists(), list(home.rglob("*"))[:10]
    assert list((workdir / "cache" / "bitmind" / "onnx").glob("*.onnx"))  # the probe miners' trunk, in the work folder
    chain = LocalChain(status["chain"])
    try:
        # weights land every epoch (4 blocks): the chain needs strictly more than weights_rate_limit blocks
        assert (chain.params.seconds_per_block, chain.params.weights_rate_limit) == (0.5, 3)
        weights = chain.get_weights(status["validator"]["hotkey"])
        assert chain.last_weights_block(status["validator"]["hotkey"]) is not None
    finally:
        chain.close()
    assert set(by_uid) <= set(weights) and sum(weights.values()) == pytest.approx(1.0)
    assert {uid: row["weight"] for uid, row in by_uid.items()} == pytest.approx({uid: weights[uid] for uid in by_uid})
    baseline = next(row for row in summary["miners"] if row["detector"] == "baseline")
    assert all(baseline["weight"] < row["weight"] for row in summary["miners"] if row is not baseline), summary
    # the killed miner stopped answering (at most a request in flight), so its EMA score decayed while the
    # validator kept querying everyone
    killed = by_uid[target["uid"]]
    assert killed["score"] < score_at_kill
    assert killed["answered"] <= answered_at_kill + 1
    assert all(row["answered"] >= ROUNDS for uid, row in by_uid.items() if uid != target["uid"])
