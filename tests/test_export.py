"""bitmind-export and the sn34 score: every torch detector exports to a package that gives the served detector's
probabilities and passes `check`; `check` refuses each documented violation with its own message (the load runs
in a fresh process without network); the score and the degradation chain are the benchmark's; bitmind-arena
compares "as served" and "as exported" in one table."""

import http.server
import io
import json
import math
import threading
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from base_miner.arena import cli as arena_cli
from base_miner.arena.robustness import perturb
from base_miner.detectors.aggregator import StackedAggregator
from base_miner.export import cli
from base_miner.export.bench import bench_input, degrade
from base_miner.export.check import FORBIDDEN_CALLS, PackageError, check_package, static_problems
from base_miner.export.package_detector import as_detector_config
from base_miner.export.score import blend, sn34_from, sn34_score
from base_miner.export.writer import ExportError, export_gas
from base_miner.registry import ConfigError, build_detector


def _images(size: int, count: int = 6, seed: int = 0) -> list[Image.Image]:
    """Noise over colour gradients: every detector gives varied, non-trivial answers on these."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    images = []
    for i in range(count):
        base = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2, np.full((size, size), 40.0 * i)], -1)
        pixels = np.clip(base + rng.normal(0, 25 + 10 * i, (size, size, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def _assert_same_answers(package: list[float], served: list[float], atol: float = 1e-4) -> None:
    """Probabilities within `atol`; logits too (relative 1e-3), which also holds for saturated answers near 0 or 1."""
    package, served = np.array(package), np.array(served)
    np.testing.assert_allclose(package, served, atol=atol, rtol=0)
    logit = lambda p: np.log(np.clip(p, 1e-12, 1)) - np.log(np.clip(1 - p, 1e-12, 1))  # noqa: E731
    assert logit(served).std() > 0.01  # the images give varied answers, so agreement means something
    if atol <= 1e-4:
        np.testing.assert_allclose(logit(package), logit(served), rtol=1e-3, atol=1e-3)


def _yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# --- detectors to export: shipped weights where cheap, small untrained (or randomly fitted) models elsewhere ----
def _checkpoint(folder: Path, config: dict, head: str) -> Path:
    """An untrained detector saved once, so served and exported share its random weights. Random nets answer
    nearly the same for every image; its last linear layer (`head`) is rescaled so the logits on the test images
    have mean 0 and standard deviation 1, which makes agreement between served and exported meaningful."""
    detector = build_detector(config, device="cpu")
    logits = torch.logit(torch.tensor(detector.predict(_images(detector.settings.image_size)), dtype=torch.float64))
    last = detector.model.get_submodule(head)
    with torch.no_grad():
        last.weight.div_(float(logits.std()))
        last.bias.sub_(float(logits.mean())).div_(float(logits.std()))
    return detector.save(folder) / "config.yaml"


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """kind -> (config YAML, native input side)."""
    folder = tmp_path_factory.mktemp("configs")
    g = torch.Generator().manual_seed(0)
    variants = (("probe", 64, False, None, False), ("probe_head", 64, True, None, False), ("probe_views", 128, False, 32, True))
    for variant, side, include_head, zoom_crop, half_scale in variants:
        config = {"detector": "probe", "image_size": side, "pretrained": False, "include_head": include_head,
                  "zoom_crop": zoom_crop, "half_scale": half_scale}  # fmt: skip
        probe = build_detector(config, device="cpu")
        n = probe.model.num_features
        probe.set_head(torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) + 0.5,
                       torch.randn(n, generator=g) * 0.05, 0.1)  # fmt: skip
        probe.save(folder / variant)
    torch.manual_seed(0)
    tiny = _checkpoint(folder / "tiny", {"detector": "tiny_cnn", "image_size": 32, "width": 4}, head="head.3")
    npr32 = _checkpoint(folder / "npr32", {"detector": "NPR", "image_size": 32}, head="fc")
    ucf = {"detector": "UCF", "backbone": "resnet10t", "feature_dim": 16, "hidden_dim": 16, "num_methods": 2, "image_size": 64}
    aggregator = StackedAggregator(
        ["general", "npr"], ["face"], {"logit:general": 0.8, "logit:npr": -0.6, "logit:face": 1.5, "ran:face": 0.3}, 0.2
    ).save(folder / "aggregator.json")
    camo = {
        "detector": "CAMO", "gate": {"name": "face"}, "always": ["general", "npr"], "combine": "stacked",
        "aggregator": str(aggregator), "experts": {"general": str(tiny), "npr": str(npr32), "face": str(tiny)},
    }  # fmt: skip
    return {
        "generalist": (Path("generalist"), 160),  # shipped weights
        "NPR": (Path("npr"), 96),  # shipped weights
        "probe": (folder / "probe" / "config.yaml", 64),
        "probe_head": (folder / "probe_head" / "config.yaml", 64),  # stage statistics and the pooled head features
        # and the centre crop read at stride 1, and the image at half its side
        "probe_views": (folder / "probe_views" / "config.yaml", 128),
        "tiny_cnn": (tiny, 32),
        "UCF": (_checkpoint(folder / "ucf", ucf, head="head.4"), 64),
        "CAMO": (_yaml(folder / "camo.yaml", camo), 32),
    }


@pytest.fixture(scope="module")
def exported(configs, tmp_path_factory) -> dict[str, Path]:
    """Each detector exported at its native size (no resampling anywhere: served and exported see the same pixels)."""
    out = tmp_path_factory.mktemp("packages")
    return {kind: export_gas(str(config), out / kind, resize=size).folder for kind, (config, size) in configs.items()}


@pytest.mark.parametrize("kind", ["generalist", "NPR", "probe", "probe_head", "probe_views", "tiny_cnn", "UCF", "CAMO"])
def test_exported_package_gives_the_served_probabilities(kind, configs, exported):
    config, size = configs[kind]
    images = _images(size)
    served = build_detector(str(config), device="cpu").predict(images)
    package = build_detector(as_detector_config(exported[kind]), device="cpu").predict(images)
    _assert_same_answers(package, served)


@pytest.mark.parametrize("kind", ["generalist", "NPR", "probe", "tiny_cnn", "UCF", "CAMO"])
def test_every_export_passes_check(kind, exported, capsys):
    assert cli.main(["check", str(exported[kind]), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "ms/image" in out and "no network" in out


def test_default_export_at_256_follows_the_served_resize(tmp_path):
    """The generalist resizes 256² challenges to 160²; inside the package torch does it, within a pixel of PIL."""
    folder = export_gas("generalist", tmp_path / "g256").folder
    assert yaml.safe_load((folder / "model_config.yaml").read_text())["preprocessing"]["resize"] == [256, 256]
    images = _images(256, count=4)
    served = build_detector("generalist", device="cpu").predict(images)
    package = build_detector(as_detector_config(folder), device="cpu").predict(images)
    _assert_same_answers(package, served, atol=0.01)


@pytest.mark.parametrize("combine, extra", [("max", {}), ("weighted_mean", {"weights": {"general": 2.0, "npr": 1.0, "face": 1.0}})])
def test_camo_rules_export_and_the_face_route_is_dropped(combine, extra, configs, tmp_path):
    camo = {**yaml.safe_load(configs["CAMO"][0].read_text()), "combine": combine, **extra}
    camo.pop("aggregator")
    config = _yaml(tmp_path / "camo.yaml", camo)
    result = export_gas(str(config), tmp_path / "pkg", resize=32)
    assert result.experts == ["general", "npr"] and result.combine == combine
    assert len(result.dropped) == 1 and result.dropped[0].startswith("face route")
    assert "dropped: face route" in (result.folder / "model.py").read_text()
    images = _images(32)
    served = build_detector(str(config), device="cpu").predict(images)
    package = build_detector(as_detector_config(result.folder), device="cpu").predict(images)
    _assert_same_answers(package, served)


def test_export_cli_writes_folder_and_zip_and_refuses_what_cannot_export(configs, tmp_path, capsys, caplog):
    out = tmp_path / "tiny"
    assert cli.main(["gas", "--detector", str(configs["tiny_cnn"][0]), "--out", str(out), "--zip", "--resize", "32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.py", "model.safetensors", "model_config.yaml"]
    with zipfile.ZipFile(tmp_path / "tiny.zip") as archive:
        assert sorted(archive.namelist()) == ["model.py", "model.safetensors", "model_config.yaml"]
    config = yaml.safe_load((out / "model_config.yaml").read_text())
    assert config == {"name": "bitmind-tiny_cnn", "version": config["version"], "modality": "image",
                      "preprocessing": {"resize": [32, 32]}, "model": {"num_classes": 2, "weights_file": "model.safetensors"}}  # fmt: skip
    assert "bitmind-export check" in capsys.readouterr().out
    zipped = build_detector(as_detector_config(tmp_path / "tiny.zip"), device="cpu").predict(_images(32))
    folder = build_detector(as_detector_config(out), device="cpu").predict(_images(32))
    assert zipped == folder
    assert cli.main(["gas", "--detector", "baseline", "--out", str(tmp_path / "b")]) == 2
    assert "has no torch-only export" in caplog.text
    with pytest.raises(ExportError, match="resize must be"):
        export_gas(str(configs["tiny_cnn"][0]), tmp_path / "x", resize=4)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["gas", "--detector", "npr", "--out", "x", "--resize", "0"])


# --- check refusals ---------------------------------------------------------------------------------------------
_MODEL = '''import torch
from safetensors.torch import load_file
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x.float().mean((2, 3)) / 255.0){tail}


def load_model(weights_path, num_classes=2):
    {prelude}model = Net()
    model.load_state_dict(load_file(weights_path))
    model.train(False)
    return model
'''


def _package(folder: Path, tail: str = "", prelude: str = "", source: str | None = None, weights: nn.Module | None = None,
             config: dict | None = None) -> Path:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(source if source is not None else _MODEL.format(tail=tail, prelude=prelude))
    layer = weights or nn.Linear(3, 2)
    save_file({f"fc.{key}": value for key, value in layer.state_dict().items()}, str(folder / "model.safetensors"))
    base = {"name": "t", "version": "1", "modality": "image", "preprocessing": {"resize": [16, 16]},
            "model": {"num_classes": 2, "weights_file": "model.safetensors"}}  # fmt: skip
    (folder / "model_config.yaml").write_text(yaml.safe_dump(config if config is not None else base))
    return folder


def test_a_plain_handwritten_package_passes(tmp_path):
    report = check_package(_package(tmp_path / "ok"))
    assert report.ok, report.problems
    assert report.info.resize == (16, 16) and report.ms_per_image is not None and report.load_seconds is not None


@pytest.mark.parametrize("module", ["os", "sys", "subprocess", "socket", "requests", "urllib.request", "pickle", "importlib", "threading", "yaml"])
def test_check_refuses_forbidden_imports(module, tmp_path):
    report = check_package(_package(tmp_path / "p", source=f"import {module}\n" + _MODEL.format(tail="", prelude="")))
    assert len(report.problems) == 1 and report.problems[0].startswith(f"model.py line 1: imports {module!r}, ")
    assert report.problems[0].endswith("not on the benchmark's list of allowed modules" if module == "yaml" else ")")
    assert ("blocked by the benchmark" in report.problems[0]) == (module != "yaml")


def test_check_refuses_relative_and_from_imports():
    assert static_problems("from os import path\n" + _MODEL.format(tail="", prelude=""))[0].startswith("model.py line 1: imports 'os'")
    assert "relative import refused" in static_problems("from . import x\n" + _MODEL.format(tail="", prelude=""))[0]


@pytest.mark.parametrize("name", FORBIDDEN_CALLS)
def test_check_refuses_forbidden_calls(name, tmp_path):
    report = check_package(_package(tmp_path / "p", prelude=f"{name}('1')\n    "))
    assert report.problems == [f"model.py line 16: uses {name}(), which the benchmark refuses"]


def test_check_refuses_method_calls_named_eval():
    problems = static_problems(_MODEL.format(tail="", prelude="").replace("model.train(False)", "model.eval()"))
    assert problems == ["model.py line 18: calls .eval(), a name the benchmark refuses (write model.train(False) instead of model.eval())"]


def test_check_refuses_missing_or_unusable_load_model(tmp_path):
    source = _MODEL.format(tail="", prelude="").replace("def load_model(weights_path, num_classes=2)", "def build(weights_path)")
    assert check_package(_package(tmp_path / "a", source=source)).problems == [
        "model.py defines no top-level function load_model(weights_path, num_classes=2)"
    ]
    source = _MODEL.format(tail="", prelude="").replace("(weights_path, num_classes=2)", "(weights_path)")
    assert static_problems(source) == ["model.py: load_model must accept (weights_path, num_classes=2)"]
    assert static_problems("def load_model(:\n") == ["model.py is not valid Python: line 1: invalid syntax"]


def test_check_refuses_wrong_output_shape(tmp_path):
    report = check_package(_package(tmp_path / "p", tail="[:, :1]"), batch_size=3)
    assert report.problems == [
        "forward on a uint8 batch [3, 3, 16, 16] returned shape (3, 1); expected (3, 2): logits [real, synthetic]"
    ]


def test_check_refuses_nan_logits(tmp_path):
    report = check_package(_package(tmp_path / "p", tail=' * float("nan")'), batch_size=2)
    assert report.problems == ["forward on a uint8 batch [2, 3, 16, 16] returned non-finite logits (NaN or inf) for 2 of 2 images"]


def test_check_refuses_missing_and_mismatched_weights(tmp_path):
    missing = _package(tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    assert check_package(missing).problems == ["weights file 'model.safetensors' named by model_config.yaml is missing from the package"]
    broken = _package(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert check_package(broken).problems[0].startswith("weights file 'model.safetensors' is not a readable safetensors file")
    mismatched = check_package(_package(tmp_path / "mismatched", weights=nn.Linear(5, 2)))
    assert len(mismatched.problems) == 1
    assert mismatched.problems[0].startswith("weights file does not fit the model built by load_model: RuntimeError")
    assert "size mismatch for fc.weight" in mismatched.problems[0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"modality": "video"}, "model_config.yaml: modality must be 'image', got 'video'"),
        ({"preprocessing": {"resize": [16]}}, "model_config.yaml: preprocessing.resize must be [H, W] with integers in 1..4096, got [16]"),
        ({"model": {"num_classes": 3}}, "model_config.yaml: model.num_classes must be 2 ([real, synthetic]), got 3"),
        ({"model": {"num_classes": 2, "weights_file": "../w.safetensors"}},
         "model_config.yaml: model.weights_file must be a file name inside the package, got '../w.safetensors'"),
        ({"name": None}, "model_config.yaml: 'name' is missing"),
    ],
)
def test_check_refuses_bad_configs(change, message, tmp_path):
    config = {"name": "t", "version": "1", "modality": "image", "preprocessing": {"resize": [16, 16]}, "model": {"num_classes": 2}}
    assert check_package(_package(tmp_path / "p", config={**config, **change})).problems == [message]


def _zip(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    "member, reason",
    [("../evil.py", "leaves the package folder ('..')"), ("/tmp/evil.py", "is an absolute path"),
     ("sub/../../evil.py", "leaves the package folder ('..')")],
)  # fmt: skip
def test_check_refuses_zips_with_path_traversal(member, reason, tmp_path):
    files = {p.name: p.read_bytes() for p in _package(tmp_path / "p").iterdir()}
    archive = _zip(tmp_path / "bad.zip", {**files, member: b"x = 1\n"})
    with pytest.raises(PackageError) as exc:
        check_package(archive)
    assert str(exc.value) == f"zip {str(archive)!r}: member {member!r} {reason} (path traversal); refused"
    assert not (tmp_path / "evil.py").exists() and not Path("/tmp/evil.py").exists()


def test_check_refuses_links_in_zips_and_non_packages(tmp_path, caplog):
    files = {p.name: p.read_bytes() for p in _package(tmp_path / "p").iterdir()}
    with pytest.raises(PackageError, match="member 'link' is a symbolic link"):
        check_package(_zip(tmp_path / "link.zip", files, link="link"))
    (tmp_path / "junk.zip").write_bytes(b"PK no zip")
    assert cli.main(["check", str(tmp_path / "junk.zip")]) == 2
    assert "is neither a folder nor a zip file" in caplog.text
    assert cli.main(["check", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in caplog.text


def test_zipped_package_inside_its_folder_passes(tmp_path):
    files = {f"pkg/{p.name}": p.read_bytes() for p in _package(tmp_path / "p").iterdir()}
    assert check_package(_zip(tmp_path / "nested.zip", files)).ok


def test_check_cli_lists_every_failure(tmp_path, capsys):
    package = _package(tmp_path / "p", source="import os\n" + _MODEL.format(tail="", prelude="getattr(1, 'x')\n    "))
    assert cli.main(["check", str(package)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: model.py line 1: imports 'os'" in out and "FAIL: model.py line 17: uses getattr()" in out
    assert "2 problem(s); the benchmark would refuse this package" in out


class _Recorder(http.server.BaseHTTPRequestHandler):
    paths: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.paths.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_check_loads_without_network(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/weights.pth"
        with pytest.raises(urllib.error.HTTPError):  # the server answers this process...
            urllib.request.urlopen(url, timeout=5)
        assert _Recorder.paths == ["/weights.pth"]
        prelude = f"torch.hub.load_state_dict_from_url({url!r}, model_dir=weights_path + '.hub')\n    "
        report = check_package(_package(tmp_path / "p", prelude=prelude))
        assert _Recorder.paths == ["/weights.pth"]  # ...but never hears from the package being checked
        assert len(report.problems) == 1 and report.problems[0].startswith("load_model failed: URLError")
        assert report.network.startswith("no network")
    finally:
        server.shutdown()
        server.server_close()


def test_check_stops_a_package_that_hangs(tmp_path):
    report = check_package(_package(tmp_path / "p", source="while True:\n    pass\n\n\ndef load_model(weights_path, num_classes=2):\n    pass\n"),
                           timeout=3)  # fmt: skip
    assert report.problems == ["load and forward did not finish within 3 s"]


def test_package_detector_refuses_a_package_that_fails_the_static_check(tmp_path):
    package = _package(tmp_path / "p", source="import os\n" + _MODEL.format(tail="", prelude=""))
    with pytest.raises(ConfigError, match="fails the benchmark's checks: model.py line 1: imports 'os'"):
        build_detector(as_detector_config(package), device="cpu")


# --- score and degradation chain --------------------------------------------------------------------------------
LABELS = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
PROBS = [0.9, 0.8, 0.7, 0.55, 0.4, 0.1, 0.6, 0.3, 0.2, 0.05]


def test_sn34_score_by_hand():
    # TP 4, FN 2, FP 1, TN 3: MCC = (4·3 − 1·2) / sqrt(5·6·4·5); Brier = (1.5125 + 0.4925) / 10 = 0.2005
    mcc, brier = 10 / math.sqrt(600), 0.2005
    expected = math.sqrt(((mcc + 1) / 2) ** 1.2 * ((0.25 - brier) / 0.25) ** 1.8)
    assert expected == pytest.approx(0.18862, abs=1e-5)
    assert sn34_score(LABELS, PROBS) == pytest.approx(expected)
    assert sn34_from(mcc, brier) == pytest.approx(expected)
    assert sn34_score([1, 0], [1.0, 0.0]) == 1.0  # perfect
    assert sn34_score([1, 0, 1, 0], [0.5] * 4) == pytest.approx(1e-6)  # Brier 0.25: the floor
    assert sn34_score([1, 0], [0.0, 1.0]) == pytest.approx(1e-6)  # confidently wrong: MCC -1, Brier 1
    # P = 0.5 is "real" (the benchmark predicts synthetic only above 0.5): MCC 0, Brier 0.125 -> sqrt(0.5^1.2 · 0.5^1.8)
    assert sn34_score([1, 0], [0.5, 0.0]) == pytest.approx(math.sqrt(0.5**3))
    assert sn34_score([], []) is None
    with pytest.raises(ValueError):
        sn34_from(float("nan"), 0.1)


def test_blend_weights_the_degraded_pass_by_0_2():
    assert blend(0.6, 0.4) == pytest.approx(0.56)
    assert blend(0.6, None) == 0.6 and blend(None, 0.4) is None


def _reencode(image: Image.Image, codec: str, quality: int, **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=codec, quality=quality, **options)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_degradation_chain_is_the_benchmarks():
    small = _images(256, count=1)[0]
    chained = _reencode(_reencode(_reencode(small, "JPEG", 55, subsampling=2), "WEBP", 75, method=4), "JPEG", 80, subsampling=2)
    out = degrade(small)
    assert out.size == small.size and np.array_equal(np.asarray(out), np.asarray(chained))  # 256²: never down-scaled
    assert np.array_equal(np.asarray(degrade(small)), np.asarray(out))  # deterministic
    large = _images(600, count=1)[0]
    codecs_only = _reencode(_reencode(_reencode(large, "JPEG", 55, subsampling=2), "WEBP", 75, method=4), "JPEG", 80, subsampling=2)
    degraded = degrade(large)
    assert degraded.size == (600, 600) and not np.array_equal(np.asarray(degraded), np.asarray(codecs_only))  # 600 -> 300 -> 600
    assert np.array_equal(np.asarray(perturb(large, "sn34_chain", 1)), np.asarray(degraded))
    assert perturb(large, "sn34_chain", 0).tobytes() == large.tobytes()


def test_bench_input_crops_to_the_aspect_then_resizes():
    square = _images(256, count=1)[0]
    assert np.array_equal(bench_input(square, (256, 256)), np.asarray(square))  # declared size: untouched
    wide = np.zeros((256, 512, 3), dtype=np.uint8)
    wide[:, 128:384] = np.asarray(square)
    assert np.array_equal(bench_input(Image.fromarray(wide), (256, 256)), np.asarray(square))  # the centre, no resampling
    assert bench_input(square, (100, 50)).shape == (100, 50, 3)
    with pytest.raises(ValueError):
        bench_input(square, (0, 10))


# --- the arena: "as served" and "as exported" in one table --------------------------------------------------------
def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_arena_scores_served_and_exported_detectors_alike(configs, exported, tmp_path):
    images = _images(32, count=8, seed=1)
    table = pa.table({"image": [{"bytes": _png(im), "path": None} for im in images], "label": [0, 1] * 4,
                      "source": ["s"] * 8, "generator": ["", "g"] * 4})  # fmt: skip
    pq.write_table(table, tmp_path / "data.parquet")
    out = tmp_path / "arena"
    argv = ["--detector", str(configs["tiny_cnn"][0]), "--detector", str(exported["tiny_cnn"]), "--dataset",
            str(tmp_path / "data.parquet"), "--robustness-rows", "8", "--sweeps", "sn34_chain", "--out", str(out)]  # fmt: skip
    assert arena_cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())["detectors"]
    served, package = (results[name]["datasets"][f"{tmp_path.name}/data"] for name in ("tiny", str(exported["tiny_cnn"])))
    assert results[str(exported["tiny_cnn"])]["config"].startswith("{'detector': 'gas_package'")
    for key in ("sn34", "sn34_degraded", "sn34_blended", "mcc", "brier"):
        assert package[key] == pytest.approx(served[key], abs=1e-6), key
    assert served["sn34_blended"] == pytest.approx(0.8 * served["sn34"] + 0.2 * served["sn34_degraded"])
    chain = results["tiny"]["robustness"][f"{tmp_path.name}/data"]["sn34_chain"]
    assert [p["level"] for p in chain] == [0, 1] and chain[0]["sn34"] == pytest.approx(served["sn34"])
    board = (out / "leaderboard.md").read_text()
    assert "| sn34 | sn34 degraded | sn34 blended |" in board
