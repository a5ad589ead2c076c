"""Detectors: NPR, UCF, generalist, baseline — building, inference, checkpoints, and their published mechanics."""

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from base_miner import checkpoint
from base_miner.checkpoint import WeightsError, load_state_dict, resolve_weights, save_checkpoint
from base_miner.detectors.generalist import (
    BACKBONE,
    efficientnet_pytorch_to_timm,
    load_package_state_dict,
)
from base_miner.detectors.npr import NPRNet, npr
from base_miner.registry import ConfigError, build_detector

TINY_UCF = {"backbone": "test_resnet", "image_size": 64, "feature_dim": 16, "hidden_dim": 16}
# (packaged config, overrides that keep the test fast on 2 shared CPU cores)
TORCH_DETECTORS = {
    "npr": ("npr", {"image_size": 64}),
    "ucf": ("ucf", TINY_UCF),
    "generalist": ("generalist", {"image_size": 64}),
}


@pytest.fixture
def odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (199, 257, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (45, 31), dtype=np.uint8), mode="L").convert("RGB"),
        Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)),
    ]


def build(key: str, device: str = "cpu", **extra):
    config, overrides = TORCH_DETECTORS[key]
    return build_detector(config, device=device, **{**overrides, **extra})


# --- every detector ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, overrides",
    [*TORCH_DETECTORS.values(), ("baseline", {}), ("baseline_random", {}), ("npr", {}), ("generalist", {})],
    ids=[*TORCH_DETECTORS, "baseline", "baseline_random", "npr-256", "generalist-224"],
)
def test_packaged_config_predicts_probabilities_for_odd_images(config, overrides, odd_images):
    detector = build_detector(config, device="cpu", **overrides)
    predictions = detector.predict_detailed(odd_images)
    assert len(predictions) == len(odd_images)
    for p in predictions:
        assert 0.0 <= p.probability <= 1.0 and np.isfinite(p.probability)
        assert p.route == detector.name and p.experts == {detector.name: p.probability}
    assert detector.predict([]) == []


@pytest.mark.parametrize("key", list(TORCH_DETECTORS))
def test_save_then_load_gives_identical_outputs(key, odd_images, tmp_path):
    original = build(key, weights=None)
    with torch.no_grad():  # move every tensor off its initial value, so only a real round trip reproduces it
        noise = torch.Generator().manual_seed(0)
        for parameter in original.model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=noise) * 0.01)
    folder = original.save(tmp_path / "ckpt")
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["weights"] == "." and not {"config_dir", "device", "num_threads"} & set(saved)

    reloaded = build_detector(folder / "config.yaml", device="cpu")
    assert reloaded.predict(odd_images) == original.predict(odd_images)
    # The round trip is what makes them equal: a fresh untrained build answers differently.
    assert build(key, weights=None).predict(odd_images) != original.predict(odd_images)


def test_chunked_batches_match_one_batch(odd_images, tmp_path):
    folder = build("npr").save(tmp_path / "npr")
    whole = build_detector(folder / "config.yaml", device="cpu", batch_size=32).predict(odd_images * 3)
    chunked = build_detector(folder / "config.yaml", device="cpu", batch_size=2).predict(odd_images * 3)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)


def test_half_on_cpu_falls_back_to_fp32(odd_images):
    detector = build("npr", half=True)
    assert detector.half is False
    assert all(p.dtype == torch.float32 for p in detector.model.parameters())
    assert all(0.0 <= p <= 1.0 for p in detector.predict(odd_images))


def test_nan_logits_answer_one_half(odd_images, caplog):
    detector = build("npr")
    with torch.no_grad():
        detector.model.fc.bias.fill_(float("nan"))
    assert detector.predict(odd_images) == [0.5] * 3
    assert "NaN" in caplog.text


def test_transform_crops_without_resampling_in_center_crop_mode():
    detector = build("npr", resize_mode="center_crop")  # image_size 64
    pixels = np.random.default_rng(1).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    tensor = detector.transform(Image.fromarray(pixels))
    crop = pixels[18:82, 13:77].astype(np.float32) / 255.0
    expected = (crop - np.array(detector.settings.mean)) / np.array(detector.settings.std)
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_transform_resizes_short_side_in_short_side_mode():
    detector = build("ucf")  # image_size 64, short_side
    image = Image.new("RGB", (256, 128), (255, 0, 0))
    tensor = detector.transform(image)
    assert tensor.shape == (3, 64, 64)
    torch.testing.assert_close(tensor[0], torch.ones(64, 64))  # red channel at 255 → (1 − 0.5) / 0.5


def test_bad_images_are_rejected_clearly():
    detector = build("npr")
    with pytest.raises(TypeError, match="PIL images"):
        detector.predict([np.zeros((8, 8, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="no pixels"):
        detector.predict([Image.new("RGB", (0, 5))])


# --- configuration errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, overrides, message",
    [
        ("npr", {"image_sise": 64}, "image_sise"),
        ("npr", {"image_size": 63}, "even image_size"),
        ("npr", {"batch_size": 0}, "batch_size"),
        ("npr", {"std": [0.2, 0.0, 0.2]}, "std"),
        ("npr", {"weights": 42}, "weights"),
        ("ucf", {**TINY_UCF, "backbone": "no_such_net"}, "no_such_net"),
        ("ucf", {**TINY_UCF, "loss_weights": {"common": -1}}, "loss_weights.common"),
        ("generalist", {"image_size": 64, "drop_rate": 1.5}, "drop_rate"),
        ("baseline", {"value": 1.5}, "value"),
        ("baseline", {"mode": "clever"}, "mode"),
    ],
)
def test_invalid_config_is_a_config_error(config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_detector(config, device="cpu", **overrides)


def test_unusable_device_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="unknown torch device"):
        build("npr", device="warp-drive")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        build_detector("npr", device="cuda", image_size=64)


# --- checkpoints --------------------------------------------------------------------------------------------------
def test_missing_weights_fail_at_construction(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build("npr", weights=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        build("npr", weights=str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match="is a file"):
        build("npr", weights=str(tmp_path / "file.bin"))


def test_corrupt_checkpoint_fails_at_construction(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        build("npr", weights=str(tmp_path))


def test_mismatched_checkpoint_fails_at_construction(tmp_path):
    npr_folder = build("npr").save(tmp_path / "npr")
    with pytest.raises(WeightsError, match="does not match.*missing.*unexpected"):
        build("generalist", weights=str(npr_folder))
    ucf_folder = build("ucf").save(tmp_path / "ucf")
    with pytest.raises(WeightsError, match="wrong shape"):
        build("ucf", weights=str(ucf_folder), feature_dim=32)


def test_weights_resolve_relative_to_yaml_then_packaged_folder(tmp_path, monkeypatch):
    state = NPRNet().state_dict()
    save_checkpoint(tmp_path / "configs" / "mine", {"detector": "NPR"}, state)
    assert resolve_weights("mine", tmp_path / "configs") == (tmp_path / "configs" / "mine").resolve()

    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path / "packaged")
    save_checkpoint(tmp_path / "packaged" / "npr-v1", {"detector": "NPR"}, state)
    assert resolve_weights("npr-v1", tmp_path / "configs") == (tmp_path / "packaged" / "npr-v1").resolve()
    loaded = load_state_dict(resolve_weights("npr-v1", tmp_path / "configs"))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_hub_id_is_fetched_with_snapshot_download(tmp_path, monkeypatch):
    folder = save_checkpoint(tmp_path / "snapshot", {"detector": "NPR"}, NPRNet().state_dict())
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    detector = build("npr", weights="bitmind/npr-sn34@v2")
    assert detector.model is not None
    assert calls == [("bitmind/npr-sn34", {"revision": "v2", "allow_patterns": ["*.safetensors", "*.yaml"]})]


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(WeightsError, match="could not fetch weights 'bitmind/absent'"):
        build("npr", weights="bitmind/absent")
    with pytest.raises(WeightsError, match="not a hub id"):
        build("npr", weights="no/such/deep/path")


# --- NPR ----------------------------------------------------------------------------------------------------------
def test_npr_is_pixel_minus_top_left_of_its_2x2_block():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0], [5.0, 6.0, 7.0, 8.0, 9.0], [9.0, 9.0, 9.0, 9.0, 9.0]])
    # Odd height/width: the last row and column are cropped away.
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.0], [4.0, 5.0, 4.0, 5.0]])
    torch.testing.assert_close(npr(x.view(1, 1, 3, 5)), expected.view(1, 1, 2, 4))
    assert torch.count_nonzero(npr(torch.full((2, 3, 8, 6), 0.37))) == 0


def test_npr_network_matches_published_size():
    net = NPRNet()
    assert abs(sum(p.numel() for p in net.parameters()) - 1.44e6) < 0.01e6
    assert net.stem[0].kernel_size == (3, 3) and net.stem[0].stride == (2, 2)
    assert (len(net.layer1), len(net.layer2), net.fc.in_features) == (3, 4, 512)


# --- UCF ----------------------------------------------------------------------------------------------------------
def test_ucf_training_loss_reaches_both_encoders_and_decoder():
    detector = build("ucf", num_methods=3)
    detector.model.train()
    batch = torch.randn(4, 3, 64, 64)
    loss = detector.training_loss(batch, torch.tensor([0, 1, 1, 0]), methods=torch.tensor([0, 1, 2, 0]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(detector.last_loss_terms) == {"common", "specific", "reconstruction", "contrastive"}
    loss.backward()
    m = detector.model
    for part in (m.forgery_encoder, m.content_encoder, m.decoder, m.common, m.specific, m.head, m.method_head):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_ucf_methods_must_be_in_range():
    detector = build("ucf", num_methods=3)
    with pytest.raises(ValueError, match="methods"):
        detector.training_loss(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]), methods=torch.tensor([0, 3]))


def test_ucf_inference_runs_only_the_forgery_path(odd_images):
    detector = build("ucf")
    m = detector.model
    called: set[str] = set()
    parts = {
        "forgery_encoder": m.forgery_encoder,
        "common": m.common,
        "head": m.head,
        "content_encoder": m.content_encoder,
        "content_proj": m.content_proj,
        "decoder": m.decoder,
        "specific": m.specific,
        "method_head": m.method_head,
    }
    for name, part in parts.items():
        for module in part.modules():
            module.register_forward_hook(lambda *_, name=name: called.add(name))
    detector.predict(odd_images)
    assert called == {"forgery_encoder", "common", "head"}


# --- generalist ---------------------------------------------------------------------------------------------------
def test_generalist_backbone_holds_the_package_tensors():
    package = load_package_state_dict()
    net = build("generalist", weights=None).model.net  # no trained checkpoint: the package backbone
    # The new one-logit head starts at zero, so every image starts at p = 0.5.
    assert not net.classifier.weight.any() and not net.classifier.bias.any()
    backbone = [t for k, t in net.state_dict().items() if not k.startswith("classifier.")]
    reference = [t for k, t in package.items() if not k.startswith("_fc.")]
    # Both networks list their tensors in the same layer order, independently of our key mapping.
    assert len(backbone) == len(reference) == 294
    assert all(torch.equal(a, b) for a, b in zip(backbone, reference, strict=True))


def test_generalist_without_pretraining_is_random():
    net = build("generalist", pretrained=False).model.net
    assert not torch.equal(net.conv_stem.weight, load_package_state_dict()["_conv_stem.weight"])


@pytest.mark.parametrize(
    "sample, classes",
    [("coffee", {504, 967, 968}), ("chelsea", {281, 282, 283, 284, 285})],  # mug/espresso/cup; domestic cats
)
def test_mapped_imagenet_network_recognises_samples(sample, classes):
    from skimage import data

    classifier = timm.create_model(BACKBONE, pretrained=False).eval()
    classifier.load_state_dict(efficientnet_pytorch_to_timm(load_package_state_dict(), classifier))
    detector = build("generalist", image_size=224, resize_mode="short_side")
    batch = detector.transform(Image.fromarray(getattr(data, sample)())).unsqueeze(0)
    with torch.inference_mode():
        top5 = classifier(batch).topk(5).indices[0].tolist()
    assert classes & set(top5)


def test_mapping_rejects_foreign_keys():
    classifier = timm.create_model(BACKBONE, pretrained=False)
    with pytest.raises(WeightsError, match="no counterpart"):
        efficientnet_pytorch_to_timm({"_blocks.99._bn1.weight": torch.zeros(1)}, classifier)
    with pytest.raises(WeightsError, match="does not fit"):
        efficientnet_pytorch_to_timm({"_conv_stem.weight": torch.zeros(1)}, classifier)


# --- baseline -----------------------------------------------------------------------------------------------------
def test_baseline_constant_and_seeded_random(odd_images):
    assert build_detector("baseline", value=0.25).predict(odd_images) == [0.25] * 3
    first = build_detector("baseline_random", seed=7).predict(odd_images * 4)
    again = build_detector("baseline_random", seed=7).predict(odd_images * 4)
    other = build_detector("baseline_random", seed=8).predict(odd_images * 4)
    assert first == again != other and all(0.0 <= p <= 1.0 for p in first)
