"""The miner process end to end on 127.0.0.1: a LocalChain, real wallets, a real Axon and Dendrite."""

import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from bitmind.chain.local import LocalChain
from bitmind.config import build_config
from bitmind.image_codec import encode_image
from bitmind.transport import ValidatorClient
from neurons.miner import Miner, build_parser, worker_layout
from tests._wallets import LOOPBACK, free_port, make_wallet


class MinerHarness:
    """A registered miner running `Miner.run()` in a thread, plus a validator and an outsider wallet."""

    def __init__(self, root: Path, detector: str = "baseline_random", extra: list[str] | None = None) -> None:
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
            "--axon.ip", LOOPBACK, "--axon.port", str(self.port), "--axon.external_ip", LOOPBACK,
            "--neuron.detector", detector, "--neuron.device", "cpu",
            "--neuron.state_dir", str(root / "state"), "--neuron.sync_interval", "1",
            "--neuron.watchdog_timeout", "0",
        ] + (extra or [])
        self.config = build_config(build_parser(), argv)
        self.torch_threads = torch.get_num_threads()  # the miner sets them for its process; restore for later tests
        self.miner = Miner(self.config)
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

    def query(self, wallet, images: list[str], timeout: float = 9.0):
        client = ValidatorClient(wallet, external_ip=LOOPBACK)
        try:
            return client.query_sync([self.axon()] * len(images), images, timeout)
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
    with pytest.raises(SystemExit, match="not registered"):
        Miner(config)


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
