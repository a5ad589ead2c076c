"""bitmind-arena: metrics equal scikit-learn's, results.json follows its schema, reports and plots are written,
unreadable rows are counted, bad input fails with a clear message."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from base_miner.arena import cli
from base_miner.arena.metrics import binary_metrics, roc_points
from base_miner.arena.report import RESULT_KEYS
from base_miner.arena.robustness import SWEEPS, perturb

# Crafted predictions: 6 fakes, 4 reals; at 0.5 that is TP 4, FN 2, FP 1, TN 3.
LABELS = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
PROBS = [0.9, 0.8, 0.7, 0.55, 0.4, 0.1, 0.6, 0.3, 0.2, 0.05]


def test_metrics_equal_scikit_learn_and_hand_counts():
    m = binary_metrics(LABELS, PROBS)
    predicted = [int(p > 0.5) for p in PROBS]
    tp, fn, fp, tn = 4, 2, 1, 3
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx((tp + tn) / 10) == skm.accuracy_score(LABELS, predicted)
    assert m["precision"] == pytest.approx(tp / (tp + fp)) == skm.precision_score(LABELS, predicted)
    assert m["recall"] == pytest.approx(tp / (tp + fn)) == skm.recall_score(LABELS, predicted)
    assert m["f1"] == pytest.approx(skm.f1_score(LABELS, predicted))
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["mcc"] == pytest.approx(mcc) == pytest.approx(skm.matthews_corrcoef(LABELS, predicted))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(LABELS, PROBS)) == pytest.approx(19 / 24)  # fake-over-real pairs: 4+4+4+3+3+1
    assert m["ap"] == pytest.approx(skm.average_precision_score(LABELS, PROBS))
    fpr, tpr = roc_points(LABELS, PROBS)
    assert fpr[0] == 0 and tpr[-1] == 1 and len(fpr) == len(tpr)


def test_brier_and_ece_equal_scikit_learn():
    probs = [0.93, 0.82, 0.71, 0.55, 0.44, 0.12, 0.63, 0.35, 0.25, 0.05, 0.91, 0.08]  # none on a bin edge
    labels = LABELS + [0, 1]
    m = binary_metrics(labels, probs)
    assert m["brier"] == pytest.approx(skm.brier_score_loss(labels, probs))
    # ECE from scikit-learn's reliability curve: sklearn drops empty bins and gives per-bin means; weight by bin size.
    frac_fake, mean_prob = calibration_curve(labels, probs, n_bins=10, strategy="uniform")
    counts = np.histogram(probs, bins=np.linspace(0, 1, 11))[0]
    assert len(frac_fake) == (counts > 0).sum() == 10
    expected = float(np.sum(counts[counts > 0] * np.abs(frac_fake - mean_prob)) / len(probs))
    assert m["ece"] == pytest.approx(expected)
    # A perfectly calibrated constant (half the labels fake, p = 0.5 everywhere) has ECE 0 and Brier 0.25.
    flat = binary_metrics([0, 1, 0, 1], [0.5] * 4)
    assert flat["ece"] == pytest.approx(0.0) and flat["brier"] == pytest.approx(0.25)
    # Confidently wrong answers are the worst case on both.
    wrong = binary_metrics([0, 1], [1.0, 0.0])
    assert wrong["ece"] == pytest.approx(1.0) and wrong["brier"] == pytest.approx(1.0)


def test_one_class_has_no_ranking_metrics_and_empty_input_is_all_none():
    m = binary_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["auc"] is None and m["ap"] is None and m["mcc"] == 0.0
    assert roc_points([1, 1], [0.3, 0.4]) is None
    assert binary_metrics([], []) == {"n": 0, **{k: None for k in RESULT_KEYS[1:-1]}}


@pytest.mark.parametrize(
    "labels, probs", [([1, 0], [0.5]), ([2, 0], [0.1, 0.2]), ([1, 0], [0.1, float("nan")]), ([1, 0], [1.5, 0.2])]
)
def test_bad_predictions_are_rejected(labels, probs):
    with pytest.raises(ValueError):
        binary_metrics(labels, probs)


def test_robustness_levels_transform_as_named():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert perturb(image, "crop", 0.5).size == (32, 32)
    assert perturb(image, "rescale", 0.5).size == (64, 64)
    for sweep in SWEEPS.values():  # the first level is the clean image (JPEG 100 is nearly so)
        clean = np.asarray(perturb(image, sweep.name, sweep.levels[0]), dtype=np.float64)
        worst = np.asarray(perturb(image, sweep.name, sweep.levels[-1]), dtype=np.float64)
        if clean.shape == worst.shape:
            assert np.abs(clean - np.asarray(image)).mean() < np.abs(worst - np.asarray(image)).mean()
    with pytest.raises(ValueError):
        perturb(image, "sepia", 1.0)


# --- end to end ------------------------------------------------------------------------------------------------
def _png(colour: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def tiny_parquet(tmp_path: Path) -> Path:
    """12 readable rows (6 real, 6 fake) and one corrupt row."""
    images = [_png((200, 60, 60), i) for i in range(6)] + [_png((60, 60, 200), i) for i in range(6)] + [b"\xff\xd8junk"]
    labels = [0] * 6 + [1] * 6 + [1]
    table = pa.table({
        "image": [{"bytes": b, "path": None} for b in images],
        "label": labels,
        "source": ["red"] * 6 + ["blue"] * 7,
        "generator": [""] * 6 + ["g"] * 7,
    })  # fmt: skip
    path = tmp_path / "tiny.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture
def npr_config(tmp_path: Path) -> Path:
    path = tmp_path / "npr32.yaml"
    path.write_text("detector: NPR\nimage_size: 32\nbatch_size: 4\n")
    return path


def _check_schema(results: dict, detectors: list[str], datasets: list[str]) -> None:
    assert set(results["detectors"]) == set(detectors)
    for entry in results["detectors"].values():
        assert set(entry["datasets"]) == set(datasets)
        for m in entry["datasets"].values():
            assert set(RESULT_KEYS) <= set(m)
            assert isinstance(m["n"], int) and m["n"] >= 0
            for key in RESULT_KEYS[1:]:
                assert m[key] is None or isinstance(m[key], float)
            for key in ("accuracy", "precision", "recall", "f1", "auc", "ap"):
                assert m[key] is None or 0.0 <= m[key] <= 1.0
            assert m["mcc"] is None or -1.0 <= m["mcc"] <= 1.0
            assert m["ms_per_image"] >= 0


def test_arena_end_to_end_writes_schema_report_and_plots(tiny_parquet, npr_config, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "arena"
    argv = ["--detector", "baseline_random", "--detector", str(npr_config), "--dataset", str(tiny_parquet),
            "--dataset", f"{tiny_parquet}?source=blue", "--robustness-rows", "4", "--sweeps", "jpeg,crop",
            "--out", str(out), "--threads", "1"]  # fmt: skip
    assert cli.main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    datasets = [f"{tiny_parquet.parent.name}/tiny", f"{tiny_parquet.parent.name}/tiny?source=blue"]
    _check_schema(results, ["baseline_random", "npr32"], datasets)
    whole = results["detectors"]["baseline_random"]["datasets"][datasets[0]]
    assert whole["n"] == 12 and whole["unreadable"] == 1  # the corrupt row is counted, not fatal
    assert results["datasets"][datasets[0]] == {"spec": str(tiny_parquet), "rows": 13, "unreadable": 1}
    blue = results["detectors"]["npr32"]["datasets"][datasets[1]]
    assert blue["n"] == 6 and blue["auc"] is None  # one class only: no ROC-AUC
    curves = results["detectors"]["npr32"]["robustness"][datasets[0]]
    assert set(curves) == {"jpeg", "crop"}
    assert [p["level"] for p in curves["jpeg"]] == list(SWEEPS["jpeg"].levels)
    assert all(p["n"] == 4 for p in curves["crop"])
    assert "unreadable" in caplog.text

    board = (out / "leaderboard.md").read_text()
    assert "| baseline_random | 12 |" in board and "1 unreadable" in board
    plots = sorted(p.name for p in out.glob("*.png"))
    assert len(plots) == 4  # a ROC and a robustness plot per dataset
    assert sum(p.startswith("roc_") for p in plots) == 2 and sum(p.endswith("source_blue.png") for p in plots) == 2
    for plot in out.glob("*.png"):
        with Image.open(plot) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_arena_reads_imagefolders(tmp_path, caplog):
    for folder, colour in (("real", (200, 60, 60)), ("fake", (60, 60, 200))):
        (tmp_path / "imgs" / folder).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "imgs" / folder / f"{i}.png").write_bytes(_png(colour, i))
    out = tmp_path / "arena"
    argv = ["--detector", "baseline", "--dataset", str(tmp_path / "imgs"), "--robustness-rows", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    m = json.loads((out / "results.json").read_text())["detectors"]["baseline"]["datasets"]["imgs"]
    # constant 0.5 answers "real" for every image (only > 0.5 means generated): recall 0, accuracy = share of reals
    assert m["n"] == 6 and m["recall"] == 0.0 and m["accuracy"] == 0.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--detector", "no_such_detector", "--dataset", "{data}"], "no packaged detector config"),
        (["--detector", "baseline", "--dataset", "/no/such/folder"], "does not exist"),
        (["--detector", "baseline", "--dataset", "{data}?colour=red"], "must be KEY=VALUE"),
        (["--detector", "baseline", "--dataset", "{data}", "--sweeps", "sepia"], "unknown robustness sweep"),
        (["--detector", "baseline", "--dataset", "{data}?source=no-such-source"], "has no readable row"),
        (["--detector", "baseline", "--protocol", "{folder}"], "is --protocol the folder of the shared diverse"),
    ],
)
def test_arena_bad_input_exits_with_a_clear_error(args, message, tiny_parquet, tmp_path, caplog):
    argv = [a.replace("{data}", str(tiny_parquet)).replace("{folder}", str(tiny_parquet.parent)) for a in args]
    assert cli.main(argv + ["--out", str(tmp_path / "out")]) == 2
    assert message in caplog.text
    assert not (tmp_path / "out" / "results.json").exists()


def test_an_unusable_out_or_thread_count_is_refused_before_any_evaluation(tiny_parquet, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(cli, "evaluate", lambda args: pytest.fail("evaluated before --out was checked"))
    (tmp_path / "a-file").write_text("x")
    assert cli.main(["--detector", "baseline", "--dataset", str(tiny_parquet), "--out", str(tmp_path / "a-file" / "out")]) == 2
    assert "--out" in caplog.text
    for threads in ("0", "-1"):
        with pytest.raises(SystemExit) as refused:
            cli.main(["--detector", "baseline", "--dataset", str(tiny_parquet), "--threads", threads, "--out", str(tmp_path)])
        assert refused.value.code == 2


def test_arena_requires_detector_and_dataset(tmp_path, caplog):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--dataset", "x", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert cli.main(["--detector", "baseline", "--out", str(tmp_path)]) == 2
    assert "give at least one --dataset or --protocol" in caplog.text
