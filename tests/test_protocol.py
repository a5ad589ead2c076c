"""The held-out protocol: fixed groups that training never sees, per-family MCC against the same real photos, and a
table with one column per detector."""

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef

from base_miner.arena.protocol import (
    HELDOUT_FAMILIES,
    HELDOUT_REAL,
    heldout_sources,
    holdout_selectors,
    markdown_table,
    protocol_report,
)
from base_miner.training.data import parse_selector


def test_protocol_holds_out_enough_whole_groups():
    assert len(HELDOUT_FAMILIES) >= 4
    assert sum(name.startswith("faces") for name in HELDOUT_REAL) >= 2
    assert sum(not name.startswith("faces") for name in HELDOUT_REAL) >= 2
    groups = [s for g in (*HELDOUT_FAMILIES.values(), *HELDOUT_REAL.values()) for s in g]
    assert len(groups) == len(set(groups)) == len(heldout_sources())  # no source in two groups
    assert all(parse_selector(s).key == "source" for s in holdout_selectors())


def test_report_judges_each_family_against_every_held_out_real_photo():
    fam_a, fam_b = list(HELDOUT_FAMILIES)[:2]
    real_a, real_b = list(HELDOUT_REAL)[:2]
    src = ([HELDOUT_FAMILIES[fam_a][0]] * 4 + [HELDOUT_FAMILIES[fam_b][0]] * 4 + [HELDOUT_REAL[real_a][0]] * 4
           + [HELDOUT_REAL[real_b][0]] * 4 + ["trained-on-source"] * 3)  # fmt: skip
    y = [1] * 8 + [0] * 8 + [1, 0, 1]
    p = [0.9, 0.8, 0.7, 0.2] + [0.6, 0.4, 0.3, 0.1] + [0.1, 0.2, 0.3, 0.6] + [0.4, 0.45, 0.2, 0.1] + [0.0, 1.0, 0.0]
    report = protocol_report(y, p, src)
    a, b = report["families"][fam_a], report["families"][fam_b]
    assert a["n"] == 4 and a["caught"] == pytest.approx(0.75) and b["caught"] == pytest.approx(0.25)
    reals = np.r_[8:16]
    for fam, rows in ((a, np.r_[0:4]), (b, np.r_[4:8])):
        idx = np.r_[rows, reals]
        assert fam["mcc"] == pytest.approx(matthews_corrcoef(np.asarray(y)[idx], np.asarray(p)[idx] >= 0.5))
    assert report["reals"][real_a]["answered_real"] == pytest.approx(0.75)
    assert report["reals"][real_b]["answered_real"] == pytest.approx(1.0)
    summary = report["summary"]
    assert summary["n"] == 16  # the three rows of a trained-on source are ignored
    assert summary["mean_family_mcc"] == pytest.approx((a["mcc"] + b["mcc"]) / 2)
    assert summary["min_family_mcc"] == pytest.approx(min(a["mcc"], b["mcc"]))
    families_without_rows = [f for f in HELDOUT_FAMILIES if f not in (fam_a, fam_b)]
    assert all(report["families"][f]["mcc"] is None for f in families_without_rows)
    table = markdown_table({"x": report, "y": report})
    assert table.count("\n") == 2 + 6 + len(HELDOUT_FAMILIES) + len(HELDOUT_REAL)
    assert "| x | y |" in table.splitlines()[0]


def test_report_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        protocol_report([0, 1], [0.5], ["a", "b"])


def test_the_protocol_spec_selects_every_held_out_source_even_past_the_path_length_limit(tmp_path):
    from base_miner.arena.protocol import protocol_spec
    from base_miner.training.data import DatasetSpec

    spec = DatasetSpec.parse(protocol_spec(str(tmp_path)))  # far longer than a file name may be
    assert spec.location == str(tmp_path) and {s.value for s in spec.selectors} == heldout_sources()
