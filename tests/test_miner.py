"""The miner process end to end on loopback: a LocalChain, real wallets, a real Axon and Dendrite.

The miner binds with the default `--axon.ip` (bittensor's `[::]`), as operators run it.
"""

import dataclasses
import inspect
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from base_miner.registry import build_detector
from bitmind.chain import Chain, ChainError
from bitmind.chain.local import LocalChain
from bitmind.config import build_config
from bitmind.image_codec import encode_image
from bitmind.transport import ValidatorClient
from neurons.miner import Miner, build_parser, warm_up_images, worker_layout
from tests._wallets import LOOPBACK, free_port, make_wallet

REPO = Path(__file__).resolve().parents[1]
# The validator's own announced IP (a documentation address): differs from the miner's, so the Dendrite dials the
# miner's published address instead of its 0.0.0.0 shortcut for "itself".
VALIDATOR_IP = "198.51.100.7"


class FlakyChain(LocalChain):
    """A LocalChain whose `serve_axon` fails the first `failures` times, as a timed-out subtensor call does."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures
        self.serve_calls = 0

    def serve_axon(self, wallet, ip: str, port: int) -> None:
        self.serve_calls += 1
        if self.serve_calls <= self.failures:
            raise ChainError("serve_axon timed out after 60s")
        super().serve_axon(wallet, ip, port)


class MinerHarness:
    """A registered miner running `Miner.run()` in a thread, plus a validator and an outsider wallet."""

    def __init__(
        self,
        root: Path,
        detector: str = "baseline_random",
        extra: list[str] | None = None,
        serve_failures: int = 0,
        serve_retry_delays: tuple[float, ...] = (0.05,),
    ) -> None:
        self.chain_path = root / "chain.sqlite"
        self.chain = LocalChain(self.chain_path, seconds_per_block=0.5)
        wallets = root / "wallets"
        self.miner_wallet = make_wallet(wallets, "miner")
        self.validator_wallet = make_wallet(wallets, "validator")
        self.other_miner_wallet = make_wallet(wallets, "other-miner")
        self.outsider_wallet = make_wallet(wallets, "outsider")
        for wallet, stake in ((self.miner_wallet, 0.0), (self.validator_wallet, 1000.0), (self.other_miner_wallet, 0.0)):
            self.chain.register_hotkey(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address, stake=stake)
        self.port = free_port()
        argv = [
            "--chain", "local", "--chain.path", str(self.chain_path),
            "--wallet.path", str(wallets), "--wallet.name", "miner", "--wallet.hotkey", "default",
            "--axon.port", str(self.port), "--axon.external_ip", LOOPBACK,
            "--neuron.detector", detector, "--neuron.device", "cpu",
            "--neuron.state_dir", str(root / "state"), "--neuron.sync_interval", "1",
            "--neuron.watchdog_timeout", "0",
        ] + (extra or [])
        self.config = build_config(build_parser(), argv)
        self.torch_threads = torch.get_num_threads()  # the miner sets them for its process; restore for later tests
        self.flaky_chain = FlakyChain(self.chain_path, serve_failures)
        self.miner = Miner(self.config, chain=self.flaky_chain, serve_retry_delays=serve_retry_delays)
        self.thread = threading.Thread(target=self.miner.run, daemon=True)

    def __enter__(self) -> "MinerHarness":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.chain.sync().axons[0].port and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.miner.stop()
        self.thread.join(timeout=20)
        torch.set_num_threads(self.torch_threads)
        assert not self.thread.is_alive(), "miner did not shut down"

    def axon(self):
        view = self.chain.sync()
        return view.axons[view.uid_of(self.miner_wallet.hotkey.ss58_address)]

    def query(self, wallet, images: list[str], timeout: float = 9.0, **axon_changes):
        """Query the miner at its published axon (with `axon_changes`, e.g. ip="::1", applied)."""
        client = ValidatorClient(wallet, external_ip=VALIDATOR_IP)
        try:
            axon = dataclasses.replace(self.axon(), **axon_changes)
            return client.query_sync([axon] * len(images), images, timeout)
        finally:
            client.close()


def _image(seed: int) -> str:
    return encode_image(Image.effect_mandelbrot((256, 256), (-2 + seed * 0.01, -1.5, 1, 1.5), 50).convert("RGB"))


@pytest.fixture
def harness(tmp_path):
    with MinerHarness(tmp_path) as running:
        yield running


def test_registered_validator_gets_a_probability(harness):
    [response] = harness.query(harness.validator_wallet, [_image(0)])
    assert response.status == 200
    assert 0.0 <= response.prediction <= 1.0
    assert harness.chain.sync().axons[0].ip == LOOPBACK


def test_default_bind_answers_over_ipv6_too(harness):
    [response] = harness.query(harness.validator_wallet, [_image(0)], ip="::1")
    assert response.status == 200 and 0.0 <= response.prediction <= 1.0


def test_external_port_is_published_while_the_axon_port_is_served(tmp_path):
    # Behind a NAT (rented GPU boxes) validators dial the forwarded port; the miner listens on --axon.port.
    with MinerHarness(tmp_path, extra=["--axon.external_port", "40123"]) as running:
        assert (running.axon().ip, running.axon().port) == (LOOPBACK, 40123)
        assert running.query(running.validator_wallet, [_image(0)], port=running.port)[0].status == 200


def test_the_flaky_chain_stand_in_takes_what_the_interface_takes():
    def shape(method):
        return [(name, param.kind) for name, param in inspect.signature(method).parameters.items()]

    assert shape(FlakyChain.serve_axon) == shape(Chain.serve_axon)


def test_serve_axon_failure_is_retried_then_the_miner_serves(tmp_path, caplog):
    with MinerHarness(tmp_path, serve_failures=1) as running:
        assert running.query(running.validator_wallet, [_image(0)])[0].status == 200
        assert running.flaky_chain.serve_calls == 2
    [warning] = [r.getMessage() for r in caplog.records if "serve_axon" in r.getMessage() and r.levelname == "WARNING"]
    assert "failed (try 1/2): serve_axon timed out after 60s; retrying" in warning


def test_serve_axon_that_keeps_failing_stops_the_miner_with_the_reason(tmp_path):
    harness = MinerHarness(tmp_path, serve_failures=99, serve_retry_delays=(0.05, 0.05))
    try:
        with pytest.raises(SystemExit, match=f"could not publish the axon address {LOOPBACK}:{harness.port} on chain "
                                             "after 3 tries: serve_axon timed out after 60s"):
            harness.miner.run()
    finally:
        torch.set_num_threads(harness.torch_threads)
    assert harness.flaky_chain.serve_calls == 3
    with pytest.raises(ConnectionRefusedError):  # the axon was stopped on the way out
        socket.create_connection((LOOPBACK, harness.port), timeout=5).close()


def test_miner_on_a_taken_port_exits_with_one_line(tmp_path):
    chain_path = tmp_path / "chain.sqlite"
    wallet = make_wallet(tmp_path / "wallets", "miner")
    LocalChain(chain_path).register_hotkey(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "neurons.miner", "--chain", "local", "--chain.path", str(chain_path),
             "--wallet.path", str(tmp_path / "wallets"), "--wallet.name", "miner", "--wallet.hotkey", "default",
             "--axon.port", str(port), "--axon.external_ip", LOOPBACK, "--neuron.detector", "baseline_random",
             "--neuron.device", "cpu", "--neuron.state_dir", str(tmp_path / "state"), "--neuron.watchdog_timeout", "0"],
            capture_output=True, text=True, cwd=REPO, env=os.environ | {"READ_ONLY": "1"}, timeout=120,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"miner cannot run: cannot serve on [::]:{port}: Address already in use"
    assert "Traceback" not in done.stdout + done.stderr


def test_unregistered_caller_is_refused(harness):
    [response] = harness.query(harness.outsider_wallet, [_image(0)])
    assert response.status == 403 and response.prediction is None


def test_hostile_payload_gets_no_answer_and_the_miner_keeps_serving(harness):
    responses = harness.query(harness.validator_wallet, ["!!!not-an-image!!!", _image(1), "", _image(2)])
    assert [r.status for r in responses] == [200, 200, 200, 200]
    assert responses[0].prediction == -1.0 and responses[2].prediction == -1.0
    assert 0.0 <= responses[1].prediction <= 1.0 and 0.0 <= responses[3].prediction <= 1.0


def test_fifty_concurrent_queries_are_all_answered(harness):
    responses = harness.query(harness.validator_wallet, [_image(i) for i in range(50)])
    assert [r.status for r in responses] == [200] * 50
    assert all(0.0 <= r.prediction <= 1.0 for r in responses)


def test_caller_stake_is_the_queue_priority(harness, monkeypatch):
    priorities = []
    submit = harness.miner.batcher.submit

    async def recording_submit(payload, priority=0.0):
        priorities.append(priority)
        return await submit(payload, priority)

    monkeypatch.setattr(harness.miner.batcher, "submit", recording_submit)
    assert harness.query(harness.validator_wallet, [_image(0)])[0].status == 200
    assert harness.query(harness.other_miner_wallet, [_image(0)])[0].status == 200
    assert priorities == [1000.0, 0.0]


def test_force_validator_permit_refuses_miners(tmp_path):
    with MinerHarness(tmp_path, extra=["--blacklist.force_validator_permit"]) as running:
        assert running.query(running.other_miner_wallet, [_image(0)])[0].status == 403
        assert running.query(running.validator_wallet, [_image(0)])[0].status == 200


def test_min_stake_refuses_small_callers(tmp_path):
    with MinerHarness(tmp_path, extra=["--blacklist.min_stake", "5000"]) as running:
        assert running.query(running.validator_wallet, [_image(0)])[0].status == 403


def test_admitting_strangers_past_a_stake_rule_stops_start_up_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="--blacklist flags: allow_non_registered cannot be combined"):
        MinerHarness(tmp_path, extra=["--blacklist.allow_non_registered", "--blacklist.min_stake", "5"])


def test_unregistered_miner_refuses_to_start(tmp_path):
    chain_path = tmp_path / "chain.sqlite"
    LocalChain(chain_path)
    make_wallet(tmp_path / "wallets", "nobody")
    config = build_config(
        build_parser(),
        ["--chain", "local", "--chain.path", str(chain_path), "--wallet.path", str(tmp_path / "wallets"),
         "--wallet.name", "nobody", "--wallet.hotkey", "default", "--neuron.detector", "baseline",
         "--neuron.state_dir", str(tmp_path / "state"), "--neuron.watchdog_timeout", "0"],
    )
    with pytest.raises(SystemExit, match="not registered") as refused:
        Miner(config)
    assert "btcli subnet register --netuid 34 --wallet.name nobody --wallet.hotkey default" in str(refused.value)


def test_detector_flag_and_batching_flags_reach_the_miner(tmp_path):
    with MinerHarness(tmp_path, detector="baseline", extra=["--miner.batch_size", "4", "--miner.batch_wait_ms", "7"]) as running:
        assert running.miner.detector.registry_name == "baseline"
        assert running.miner.batcher.batch_size == 4 and running.miner.batcher.max_wait == pytest.approx(0.007)
        assert running.query(running.validator_wallet, [_image(0)])[0].prediction == pytest.approx(0.5)


def test_worker_and_thread_flags_reach_torch_and_the_batcher(tmp_path):
    with MinerHarness(tmp_path, detector="baseline", extra=["--miner.torch_threads", "3", "--miner.workers", "2"]) as running:
        assert torch.get_num_threads() == 3
        assert running.miner.batcher.workers == 2
        assert running.query(running.validator_wallet, [_image(0)])[0].status == 200


def test_cpu_layout_is_one_single_threaded_worker_per_core():
    assert worker_layout(0, 0, "cpu", cores=2) == (2, 1)
    assert worker_layout(0, 0, "cpu", cores=16) == (16, 1)
    # fewer workers share all cores but one
    assert worker_layout(1, 0, "cpu", cores=8) == (1, 7)
    assert worker_layout(4, 0, "cpu", cores=16) == (4, 3)
    assert worker_layout(0, 0, "cpu", cores=1) == (1, 1)
    assert worker_layout(3, 2, "cpu", cores=2) == (3, 2)  # explicit settings win


def test_gpu_layout_is_one_worker_and_torch_default_threads():
    assert worker_layout(0, 0, "cuda:0", cores=16) == (1, 0)
    assert worker_layout(2, 4, "cuda", cores=16) == (2, 4)


@pytest.mark.parametrize("workers, threads", [(-1, 0), (0, -1)])
def test_negative_layout_is_refused(workers, threads):
    with pytest.raises(SystemExit, match="--miner.workers and --miner.torch_threads"):
        worker_layout(workers, threads, "cpu", cores=2)


@pytest.mark.parametrize("config", ["camo", "camo_thumbnails"])
def test_warm_up_reaches_every_expert_so_no_query_pays_an_onnx_export(config, tmp_path, monkeypatch):
    """The demo's CAMO routes a flat image to its thumbnail expert: a flat warm-up image alone left the probe's ONNX
    export (seconds) to the first validator query, which then timed out. The warm-up images show no face either, so
    the face expert's export (about 6 s) waited for the first gated face (seen in `benchmarks/soak.py`'s run)."""
    from base_miner.detectors import onnx_serving

    monkeypatch.setenv("BITMIND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_serving, "_GRAPHS", {})
    detector = build_detector(config, device="cpu")
    detector.warm_up(warm_up_images())
    trunks = {name: detector.experts[name].model.onnx_trunk() for name in ("general", "face")}
    for name, trunk in trunks.items():
        assert trunk is not None and trunk._sessions and trunk.failed is None, name
    built = {name: set(trunk._sessions) for name, trunk in trunks.items()}
    exports = []
    monkeypatch.setattr(onnx_serving, "_export", lambda *args: exports.append(args))
    crop = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    detector.experts["face"].predict([crop])  # an aligned face crop, as the gate hands it over
    detector.experts["general"].predict([crop.resize((256, 256))])
    assert not exports and {name: set(trunk._sessions) for name, trunk in trunks.items()} == built
