"""ONNX Runtime serving of frozen trunks: same answers as torch, one export per trunk (memory, then disk), and a
clean fall-back to torch whenever the export or the runtime is missing or fails."""

import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from base_miner.detectors import onnx_serving, torch_detector
from base_miner.detectors.folding import FoldedInference
from base_miner.detectors.onnx_serving import OnnxTrunk
from base_miner.registry import ConfigError, build_detector


class _TinyTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.norm = nn.BatchNorm2d(4).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).relu().mean((2, 3))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty disk cache and no graph remembered in this process."""
    monkeypatch.setenv("BITMIND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_serving, "_GRAPHS", {})
    return tmp_path / "cache" / "onnx"


def _photos(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    smooth = [np.cumsum(rng.normal(0, 4, (256, 256, 3)), axis=k) for k in (0, 1)]
    return [Image.fromarray(np.clip(128 + smooth[i % 2] * (i + 1) / count, 0, 255).astype(np.uint8)) for i in range(count)]


def test_packaged_probe_served_by_onnxruntime_answers_as_torch_does():
    """The shipped probe on the default runtime goes through ONNX Runtime and its probabilities equal the torch
    runtime's; the session follows torch's thread count."""
    images = _photos(6)
    served = build_detector("probe", device="cpu")
    reference = build_detector("probe", device="cpu", runtime="torch")
    assert served.model.onnx_trunk() is not None and reference.model.onnx_trunk() is None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        got = [p.probability for p in served.predict_detailed(images)]
    finally:
        torch.set_num_threads(threads)
    want = [p.probability for p in reference.predict_detailed(images)]
    assert served.model.onnx_trunk().failed is None
    assert ((3, 256, 256), 1) in served.model.onnx_trunk()._sessions  # it really served, on one thread
    assert np.allclose(got, want, atol=1e-4)
    assert max(want) - min(want) > 1e-3  # the images differ, so equal answers are not a constant


def test_one_export_per_trunk_then_memory_then_disk(fresh_cache, monkeypatch):
    exports = []
    real_export = onnx_serving._export
    monkeypatch.setattr(onnx_serving, "_export", lambda *a: exports.append(1) or real_export(*a))
    trunk = _TinyTrunk().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        want = trunk(x)
        first, second = OnnxTrunk(trunk), OnnxTrunk(trunk)
        assert torch.allclose(first(x), want, atol=1e-5)
        assert torch.allclose(second(x[:1]), want[:1], atol=1e-5)  # another batch size, same graph
        assert len(exports) == 1 and len(list(fresh_cache.glob("*.onnx"))) == 1
        onnx_serving._GRAPHS.clear()  # a new process: the graph comes from disk
        assert torch.allclose(OnnxTrunk(trunk)(x), want, atol=1e-5)
        assert len(exports) == 1
        changed = _TinyTrunk().eval()  # other weights: another graph, never the cached one
        assert torch.allclose(OnnxTrunk(changed)(x), changed(x), atol=1e-5)
        assert len(exports) == 2


def test_inputs_it_cannot_serve_go_back_to_torch(fresh_cache):
    trunk = OnnxTrunk(_TinyTrunk().eval())
    assert trunk(torch.randn(2, 3, 16, 16, dtype=torch.float64)) is None
    assert trunk(torch.randn(0, 3, 16, 16)) is None
    assert trunk(torch.randn(3, 16, 16)) is None
    assert trunk.failed is None and not trunk._sessions


def test_failed_export_falls_back_to_torch_once_and_says_why(fresh_cache, monkeypatch, caplog):
    def broken(*_):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(onnx_serving, "_export", broken)
    detector = build_detector("probe", device="cpu")
    images = _photos(3)
    with caplog.at_level(logging.WARNING, logger="base_miner.detectors.onnx_serving"):
        got = [p.probability for p in detector.predict_detailed(images)]
        again = [p.probability for p in detector.predict_detailed(images)]
    warnings = [r for r in caplog.records if "ONNX Runtime cannot serve" in r.getMessage()]
    assert len(warnings) == 1 and "exporter exploded" in warnings[0].getMessage()
    want = [p.probability for p in build_detector("probe", device="cpu", runtime="torch").predict_detailed(images)]
    assert np.allclose(got, want, atol=1e-6) and got == again


def test_unwritable_cache_serves_from_memory(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BITMIND_CACHE_DIR", str(blocker))
    monkeypatch.setattr(onnx_serving, "_GRAPHS", {})
    trunk = _TinyTrunk().eval()
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.INFO, logger="base_miner.detectors.onnx_serving"), torch.inference_mode():
        assert torch.allclose(OnnxTrunk(trunk)(x), trunk(x), atol=1e-5)
    assert any("not writable" in r.getMessage() for r in caplog.records)


def test_corrupt_cached_graph_is_exported_again(fresh_cache, caplog):
    trunk = _TinyTrunk().eval()
    key = onnx_serving._content_hash(trunk, (3, 16, 16))
    fresh_cache.mkdir(parents=True)
    cached = fresh_cache / f"{key}.onnx"
    cached.write_bytes(b"\x00garbage")
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="base_miner.detectors.onnx_serving"), torch.inference_mode():
        assert torch.allclose(OnnxTrunk(trunk)(x), trunk(x), atol=1e-5)
    assert any("does not load" in r.getMessage() for r in caplog.records)
    assert cached.stat().st_size > 1000  # the bad file was replaced by the new export


def test_runtime_setting_checks_what_is_installed(monkeypatch):
    monkeypatch.setattr(torch_detector, "onnxruntime_missing", lambda: ["onnxruntime"])
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        build_detector("probe", device="cpu", runtime="onnxruntime")
    assert build_detector("probe", device="cpu").model.onnx_trunk() is None  # auto: torch serves
    with pytest.raises(ConfigError, match="runtime"):
        build_detector("probe", device="cpu", runtime="tensorrt")


class _TinyModel(FoldedInference):
    serves_onnx = True

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _TinyTrunk().eval()

    def frozen_part(self) -> nn.Module:
        return self.trunk


def test_training_and_new_weights_never_read_a_stale_graph(fresh_cache):
    model = _TinyModel()
    model.fold_for_inference(onnx=True)
    x = torch.randn(2, 3, 16, 16)
    model.run_frozen(x)  # autograd on (training): torch, no export
    assert not model.onnx_trunk()._sessions
    with torch.inference_mode():
        served = model.run_frozen(x)
    assert model.onnx_trunk()._sessions
    changed = {k: v * 2 if k == "trunk.conv.weight" else v for k, v in model.state_dict().items()}
    model.load_state_dict(changed)
    assert model.onnx_trunk() is None and model.folded() is None
    model.fold_for_inference(onnx=True)
    with torch.inference_mode():
        new = model.run_frozen(x)
        plain = model.trunk(x)
    assert model.onnx_trunk()._sessions and not torch.allclose(new, served, atol=1e-3)
    assert torch.allclose(new, plain, atol=1e-5)
    model.to("cpu")
    assert model.onnx_trunk() is None


def test_only_single_output_trunks_take_onnx():
    class Encoder(FoldedInference):
        def frozen_part(self) -> nn.Module:
            return nn.Sequential(nn.Conv2d(3, 3, 1))

    with pytest.raises(ValueError, match="cannot be served"):
        Encoder().fold_for_inference(onnx=True)


def test_concurrent_first_calls_build_one_session(fresh_cache):
    trunk = OnnxTrunk(_TinyTrunk().eval())
    x = torch.randn(2, 3, 16, 16)
    results, barrier = [], threading.Barrier(4)

    def call() -> None:
        barrier.wait()
        with torch.inference_mode():
            results.append(trunk(x))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 4 and all(torch.equal(r, results[0]) for r in results)
    assert len(trunk._sessions) == 1
