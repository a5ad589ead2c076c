"""Tests that need something a machine may lack (shared data, a tool) fail under CI instead of skipping."""

import pytest

from tests import _required


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_missing_shared_data_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="shared test data missing"):
        _required.shared_data("no-such-set/train.parquet")


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_missing_shared_data_skips_elsewhere(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no-such-set"):
        _required.shared_data("no-such-set/train.parquet")


def test_present_shared_data_is_returned(monkeypatch, tmp_path):
    (tmp_path / "set").mkdir()
    monkeypatch.setattr(_required, "SHARED_DATA", tmp_path)
    assert _required.shared_data("set") == tmp_path / "set"
