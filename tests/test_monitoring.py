"""Heartbeat file, Prometheus metrics endpoint, watchdog, wandb helper and the Monitor bundle."""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bitmind import __version__
from bitmind.config import build_config
from bitmind.monitoring.__main__ import main
from bitmind.monitoring.heartbeat import Heartbeat, check_heartbeat
from bitmind.monitoring.metrics import Metrics, MonitoringError, start_metrics_server
from bitmind.monitoring.monitor import Monitor, add_monitoring_args
from bitmind.monitoring.wandb_run import WandbLogger
from bitmind.monitoring.watchdog import WATCHDOG_EXIT_CODE, Watchdog
from bitmind.ports import free_port


# ------------------------------------------------------------------------------------------------------ heartbeat
def test_heartbeat_merges_fields_and_writes_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "heartbeat.json"
    beat = Heartbeat(path, role="validator")
    assert beat.beat(last_sync_block=100, steps=0)
    for step in range(1, 6):
        assert beat.beat(steps=step, last_step={"kind": "real", "answered": step})
    status = json.loads(path.read_text())
    assert status["steps"] == 5
    assert status["last_sync_block"] == 100  # kept from the first beat
    assert status["last_step"] == {"kind": "real", "answered": 5}
    assert status["role"] == "validator"
    assert status["version"] == __version__
    assert status["pid"] == os.getpid()
    assert abs(status["timestamp"] - time.time()) < 60
    assert list(path.parent.iterdir()) == [path]  # no temporary files left behind


def test_heartbeat_encodes_awkward_values(tmp_path: Path) -> None:
    path = tmp_path / "hb.json"
    assert Heartbeat(path).beat(score=float("nan"), ratio=float("inf"), where=tmp_path, uids=(1, 2))
    status = json.loads(path.read_text())  # strict JSON: NaN would not parse in other languages
    assert status["score"] is None and status["ratio"] is None
    assert status["where"] == str(tmp_path)
    assert status["uids"] == [1, 2]


def test_heartbeat_rejects_reserved_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        Heartbeat(tmp_path / "hb.json").beat(pid=1)


def test_heartbeat_write_failure_is_reported_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert Heartbeat(blocker / "hb.json").beat(steps=1) is False  # parent is a file: cannot write


def test_heartbeat_never_partially_written_while_read_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "hb.json"
    beat = Heartbeat(path, role="miner")
    beat.beat(payload="x" * 50_000, n=0)
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                bad.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(1, 150):
            beat.beat(payload=str(n) * (50_000 // len(str(n))), n=n)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert bad == []
    assert json.loads(path.read_text())["n"] == 149


def test_check_heartbeat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hb.json"
    assert check_heartbeat(path, 60)[0] is False
    Heartbeat(path, role="validator").beat(steps=1)
    ok, message = check_heartbeat(path, 60)
    assert ok and "validator" in message
    status = json.loads(path.read_text())
    status["timestamp"] -= 600
    path.write_text(json.dumps(status))
    ok, message = check_heartbeat(path, 60)
    assert not ok and "STALE" in message
    assert main(["check", str(path), "--max-age", "60"]) == 1
    assert main(["check", str(path), "--max-age", "6000"]) == 0
    for garbage in ("{not json", "[1, 2]", '{"timestamp": "soon"}', ""):
        path.write_text(garbage)
        assert check_heartbeat(path, 60)[0] is False
    path.write_bytes(b"\xff\xfe\x00")
    assert check_heartbeat(path, 60)[0] is False
    capsys.readouterr()


def test_a_beat_from_the_future_or_a_limit_that_is_no_number_is_not_ok(tmp_path: Path, capsys) -> None:
    path = tmp_path / "hb.json"
    Heartbeat(path, role="miner").beat()
    status = json.loads(path.read_text())
    status["timestamp"] += 3600  # the clock stepped back an hour after this beat
    path.write_text(json.dumps(status))
    ok, message = check_heartbeat(path, 60)
    assert not ok and "in the future" in message
    status["timestamp"] -= 3600 - 30  # 30 s ahead: within the tolerance of two clocks
    path.write_text(json.dumps(status))
    assert check_heartbeat(path, 60)[0] is True
    for bad in (float("nan"), 0.0, -5.0):
        with pytest.raises(ValueError):
            check_heartbeat(path, bad)
    for bad in ("nan", "0", "-1"):
        with pytest.raises(SystemExit) as refused:
            main(["check", str(path), "--max-age", bad])
        assert refused.value.code == 2
    capsys.readouterr()


# -------------------------------------------------------------------------------------------------------- metrics
def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _sample(text: str, prefix: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return None


def test_metrics_endpoint_serves_counters_that_move() -> None:
    metrics = Metrics(role="miner")
    server = start_metrics_server(0, host="127.0.0.1", registry=metrics.registry)
    try:
        assert server.port > 0
        before = _scrape(server.port)
        assert _sample(before, 'bitmind_requests_total{outcome="ok"}') is None
        assert f'bitmind_build_info{{role="miner",version="{__version__}"}} 1.0' in before

        metrics.record_request("ok", 0.020)
        metrics.record_request("ok", 0.030)
        metrics.record_request("blacklisted")
        metrics.record_request("ok", float("nan"))  # counted, latency ignored
        metrics.record_error("decode")
        metrics.set_scores({3: 0.5, 7: 0.25})
        metrics.set_scores({np.int64(7): np.float32(0.75), 9: float("nan")})  # uid 3 left; NaN not published
        metrics.record_weights(ok=False)
        metrics.record_weights(ok=True, block=1234)
        metrics.record_sync(timestamp=1_700_000_000.0)
        metrics.record_step()

        after = _scrape(server.port)
        assert _sample(after, 'bitmind_requests_total{outcome="ok"}') == 3
        assert _sample(after, 'bitmind_requests_total{outcome="blacklisted"}') == 1
        assert _sample(after, "bitmind_request_latency_seconds_count") == 2
        assert _sample(after, 'bitmind_request_latency_seconds_bucket{le="0.025"}') == 1
        assert _sample(after, 'bitmind_request_latency_seconds_bucket{le="0.05"}') == 2
        assert _sample(after, 'bitmind_errors_total{kind="decode"}') == 1
        assert _sample(after, 'bitmind_miner_score{uid="7"}') == 0.75
        assert _sample(after, 'bitmind_miner_score{uid="3"}') is None
        assert _sample(after, 'bitmind_miner_score{uid="9"}') is None
        assert _sample(after, 'bitmind_weights_set_total{ok="true"}') == 1
        assert _sample(after, 'bitmind_weights_set_total{ok="false"}') == 1
        assert _sample(after, "bitmind_last_weights_block") == 1234
        assert _sample(after, "bitmind_last_chain_sync_timestamp_seconds") == 1.7e9
        assert _sample(after, "bitmind_validator_steps_total") == 1
    finally:
        server.stop()


def test_metrics_registries_are_independent() -> None:
    first, second = Metrics(role="a"), Metrics(role="b")  # would raise "Duplicated timeseries" if global
    first.record_step()
    assert first.registry.get_sample_value("bitmind_validator_steps_total") == 1
    assert second.registry.get_sample_value("bitmind_validator_steps_total") == 0


def test_metrics_server_errors_are_clear() -> None:
    metrics = Metrics()
    server = start_metrics_server(0, registry=metrics.registry)
    try:
        with pytest.raises(MonitoringError, match="cannot serve metrics"):
            start_metrics_server(server.port, registry=Metrics().registry)
    finally:
        server.stop()
    with pytest.raises(MonitoringError, match="0..65535"):
        start_metrics_server(70000, registry=metrics.registry)
    with pytest.raises(ValueError, match="registry"):
        start_metrics_server(0)


# ------------------------------------------------------------------------------------------------------- watchdog
def test_watchdog_fires_when_not_kicked() -> None:
    expired = threading.Event()
    idle_seen: list[float] = []

    def on_expire(idle: float) -> None:
        idle_seen.append(idle)
        expired.set()

    with Watchdog(0.3, on_expire=on_expire):
        assert expired.wait(timeout=10)
    assert len(idle_seen) == 1 and idle_seen[0] >= 0.3


class ManualClock:
    """A clock the test advances: the watchdog's idle time then never depends on how fast this machine runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_does_not_fire_while_kicked_then_fires_when_kicks_stop() -> None:
    expired = threading.Event()
    clock = ManualClock()
    watchdog = Watchdog(0.2, on_expire=lambda idle: expired.set(), clock=clock).start()
    try:
        for _ in range(15):  # each step: 0.15 s without a kick (under the timeout), then a kick
            clock.now += 0.15
            expired.wait(0.05)  # let the watchdog look (it checks at least every 0.2 s of real time)
            watchdog.kick()
        assert not expired.is_set()  # 2.25 s of clock time: eleven timeouts' worth, kicked in time
        clock.now += 1.0  # progress stops
        assert expired.wait(timeout=10)
    finally:
        watchdog.stop()


def test_watchdog_stop_prevents_firing_and_bad_timeouts_are_rejected() -> None:
    expired = threading.Event()
    clock = ManualClock()
    watchdog = Watchdog(0.2, on_expire=lambda idle: expired.set(), clock=clock).start()
    watchdog.stop()
    clock.now += 10.0  # long past the timeout, but stopped
    assert not expired.wait(timeout=0.5)
    assert not watchdog.fired.is_set()
    for bad in (0, -1, float("nan"), "10"):
        with pytest.raises(ValueError, match="positive"):
            Watchdog(bad)  # type: ignore[arg-type]


def test_watchdog_default_action_exits_the_process() -> None:
    code = (
        "import time\n"
        "from bitmind.monitoring.watchdog import Watchdog\n"
        "Watchdog(0.3).start()\n"
        "time.sleep(30)\n"  # a hung main loop
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == WATCHDOG_EXIT_CODE
    assert "watchdog" in done.stderr


# ---------------------------------------------------------------------------------------------------------- wandb
def test_wandb_off_is_a_noop_without_importing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would raise ImportError
    logger = WandbLogger(enabled=False, project="p")
    logger.log({"x": 1})
    logger.finish()
    assert not logger.active
    assert not WandbLogger(enabled=True, project="p").active  # on, but not installed: warn and carry on


def test_wandb_on_logs_and_survives_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    class FakeRun:
        def log(self, data: dict, step: int | None = None) -> None:
            calls.append(("log", data, step))
            if data.get("boom"):
                raise RuntimeError("network down")

        def finish(self) -> None:
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(("init", kwargs)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = WandbLogger(enabled=True, project="proj", entity="", run_name="validator-1")
    assert logger.active
    assert calls[0] == ("init", {"project": "proj", "entity": None, "name": "validator-1", "config": {}})
    logger.log({"score": 0.5}, step=3)
    assert calls[1] == ("log", {"score": 0.5}, 3)
    logger.log({"boom": 1})  # fails: logged, wandb switched off
    assert not logger.active
    logger.log({"score": 0.6})
    assert len(calls) == 3


# -------------------------------------------------------------------------------------------------- flags, Monitor
def _config(tmp_path: Path, *argv: str):
    parser = argparse.ArgumentParser()
    parser.add_argument("--neuron.state_dir", default=str(tmp_path / "state"))
    parser.add_argument("--neuron.metrics_port", type=int, default=0)
    parser.add_argument("--neuron.metrics_host", default="127.0.0.1")
    add_monitoring_args(parser)
    return build_config(parser, list(argv))


def test_monitoring_flags_reach_the_config(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert config.neuron.heartbeat_file == "" and config.neuron.watchdog_timeout == 900
    assert config.wandb.on is False
    config = _config(tmp_path, "--neuron.heartbeat_file", "/x/hb.json", "--neuron.watchdog_timeout", "5",
                     "--wandb.on", "--wandb.project", "p", "--wandb.entity", "e")
    assert config.neuron.heartbeat_file == "/x/hb.json" and config.neuron.watchdog_timeout == 5
    assert config.wandb.on is True and config.wandb.project == "p" and config.wandb.entity == "e"


def test_monitor_from_config_wires_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    expired = threading.Event()
    config = _config(tmp_path, "--neuron.watchdog_timeout", "0.5")
    config.neuron.metrics_port = free_port()
    monitor = Monitor.from_config(config, role="validator", on_watchdog_expire=lambda idle: expired.set())
    try:
        assert monitor.watchdog is not None and monitor.watchdog.timeout_s == 0.5
        for step in range(3):
            assert monitor.beat(steps=step)
        status = json.loads((tmp_path / "state" / "heartbeat.json").read_text())
        assert status["steps"] == 2 and status["role"] == "validator"
        monitor.metrics.record_step()
        assert _sample(_scrape(monitor.server.port), "bitmind_validator_steps_total") == 1
        assert expired.wait(timeout=10)  # no more beats: the watchdog built from the flag fires
    finally:
        monitor.close()


def test_monitor_beats_kick_its_watchdog(tmp_path: Path) -> None:
    expired = threading.Event()
    clock = ManualClock()
    watchdog = Watchdog(0.2, on_expire=lambda idle: expired.set(), clock=clock).start()
    monitor = Monitor(Heartbeat(tmp_path / "hb.json"), Metrics(), watchdog=watchdog)
    try:
        for step in range(10):  # 1.5 s of clock time, beating every 0.15 s
            clock.now += 0.15
            expired.wait(0.05)
            assert monitor.beat(steps=step)
        assert not expired.is_set()
        clock.now += 1.0  # no more beats
        assert expired.wait(timeout=10)
    finally:
        monitor.close()


def test_monitor_off_switches_and_bad_values(tmp_path: Path) -> None:
    monitor = Monitor.from_config(_config(tmp_path, "--neuron.watchdog_timeout", "0"), role="miner")
    assert monitor.server is None and monitor.watchdog is None and not monitor.wandb.active
    monitor.close()
    with pytest.raises(MonitoringError, match="watchdog_timeout"):
        Monitor.from_config(_config(tmp_path, "--neuron.watchdog_timeout", "-3"), role="miner")
