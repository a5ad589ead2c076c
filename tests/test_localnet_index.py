"""bitmind-localnet's `+index` miners: the entry check, the leaderboard's real / AI-generated accuracy, and (slow) a
local subnet whose CAMO miner builds a retrieval index of the validator's real sample and answers real challenges
from it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from validator.localnet.errors import LocalnetError
from validator.localnet.miners import parse_miners
from validator.leaderboard import MinerInfo, build_leaderboard
from validator.state import STATE_FILENAME, MinerRecordState, ScorerState, ValidatorState

REPO = Path(__file__).resolve().parents[1]
NETUID = 34
ROUNDS = 24


def test_index_entries_serve_camo_with_the_index_and_need_a_camo_config():
    with_index, plain = parse_miners("camo+index, camo")
    assert (with_index.detector, with_index.label, with_index.with_index) == ("camo", "camo+index", True)
    assert (plain.detector, plain.label, plain.with_index) == ("camo", "camo", False)
    with pytest.raises(LocalnetError, match=r"entry 2: \+index needs a CAMO config; 'npr' is NPR"):
        parse_miners("camo,npr+index")
    with pytest.raises(LocalnetError, match=r"entry 1 \('camo\+nothing'\)"):
        parse_miners("camo+nothing")


def test_leaderboard_shows_which_half_of_the_challenges_each_miner_gets_right():
    history = [(0, 0.1), (0, 0.7), (0, 0.5), (1, 0.9), (1, 0.5)]  # 0.5 counts as "real"
    state = ValidatorState(netuid=NETUID, scorer=ScorerState(
        step=6, scores=[0.0, 0.2, 0.1], hotkeys=["hk-v", "hk-a", "hk-b"],
        miners={"hk-a": MinerRecordState(history=history, queried=5, answered=5),
                "hk-b": MinerRecordState(history=[(1, 0.8)], queried=1, answered=1)},
    ))  # fmt: skip
    board = build_leaderboard(state, {}, [MinerInfo(1, "hk-a", "camo_thumbnails+index"),
                                         MinerInfo(2, "hk-b", "npr")])
    first, second = board.rows
    assert (first.real_accuracy, first.fake_accuracy) == pytest.approx((2 / 3, 1 / 2))
    assert (second.real_accuracy, second.fake_accuracy) == (None, 1.0)
    lines = board.render().splitlines()
    assert "real ok" in lines[0] and "fake ok" in lines[0]
    assert lines[2].split()[5:7] == ["0.667", "0.500"] and lines[3].split()[5:7] == ["-", "1.000"]
    assert lines[2].split()[2] == "camo_thumbnails+index"  # a long label is never cut
    assert json.loads(json.dumps(board.summary()))["miners"][1]["real_accuracy"] is None


@pytest.mark.slow
def test_local_subnet_index_miner_answers_real_challenges_from_its_index(tmp_path):
    """The index is built at start from the packaged real sample; the validator's real challenges (its augmenter at
    levels 0-1) are answered by the index's calibrated probability, and no AI-generated challenge ever is."""
    workdir, summary_path = tmp_path / "net", tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "neurons.localnet", "--miners", "camo+index,baseline", "--rounds", str(ROUNDS),
         "--workdir", str(workdir), "--summary", str(summary_path), "--seconds-per-block", "0.5", "--epoch-length", "4",
         "--step-interval", "0.3", "--query-timeout", "8", "--seed", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "retrieval index" in done.stdout and "built" in done.stdout
    manifest = json.loads((workdir / "index" / "manifest.json").read_text())
    real_sample = [p for p in (REPO / "validator" / "assets" / "real_sample").iterdir() if p.suffix == ".jpg"]
    assert manifest["images"] == len(real_sample)
    summary = json.loads(summary_path.read_text())
    row = next(r for r in summary["miners"] if r["detector"] == "camo+index")
    state = ValidatorState.model_validate_json((workdir / "validator" / STATE_FILENAME).read_bytes())
    history = state.scorer.miners[next(m for m in state.scorer.hotkeys if m == row["hotkey"])].history
    from_index = [label for label, probability in history if probability == manifest["calibration"]["probability"]]
    reals = [label for label, _ in history if label == 0]
    assert reals and all(label == 0 for label in from_index), history  # the index never answers a fake
    assert len(from_index) >= 0.6 * len(reals), (len(from_index), len(reals))
    assert row["real_accuracy"] >= len(from_index) / len(reals)
    assert "camo+index" in done.stdout and "real ok" in done.stdout
