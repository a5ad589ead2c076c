"""Semi-synthetic challenges, validator side: masks on the wire and in the cache, the challenge mix, mask scoring
apart from the reward, and wire compatibility with miners that know nothing of masks."""

import base64
import io
import json
import logging
import struct
import zlib
from collections import deque

import bittensor as bt
import numpy as np
import pydantic
import pytest
from PIL import Image

from bitmind.mask_codec import MAX_MASK_BYTES, decode_mask, encode_mask, mask_from_png, mask_to_png
from bitmind.protocol import ImageSynapse
from bitmind.transport import ValidatorClient, _Dendrite, _to_response
from tests._fixtures_validator import (
    TEST_TIMEOUT,
    BrightSource,
    build_subnet,
    dark_image,
    fill_synthetic_cache,
    start_fleet,
)
from tests._wallets import LOOPBACK, make_wallet
from validator.augment import Augmenter
from validator.challenge_stats import ChallengeStats, tally_step
from validator.challenges import ChallengeSampler, SyntheticImageSource
from validator.challenges.cache import MASK_SUFFIX, ImageCache
from validator.challenges.mix import KINDS, SEMI_SYNTHETIC, kind_probs_from_fake_prob, parse_challenge_probs
from validator.challenges.splice import make_semi_synthetic
from validator.challenges.synthetic_seed import (
    packaged_synthetic_sample,
    seed_semi_synthetic_cache,
)
from validator.challenges.dataset_spec import packaged_real_sample
from validator.forward import ChallengeRunner, ForwardParams, format_step
from validator.generation.inpainting import composite
from validator.mask_score import mask_overlap, score_mask
from validator.region_mask import SHAPES, random_region_mask
from validator.reward import compute_reward
from validator.scoring import Scorer

pytestmark = pytest.mark.timeout(120)


def _png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


# --- the mask codec -------------------------------------------------------------------------------------------
def test_mask_round_trip_keeps_values_to_one_grey_level():
    rng = np.random.default_rng(0)
    soft = rng.random((40, 56)).astype(np.float32)
    decoded = decode_mask(encode_mask(soft), (40, 56))
    assert decoded.shape == (40, 56) and decoded.dtype == np.float32
    assert np.abs(decoded - soft).max() <= 0.5 / 255 + 1e-6
    assert decode_mask(encode_mask(soft > 0.5), (40, 56)).max() == 1.0  # boolean maps are accepted


def _png_header(width: int, height: int) -> str:
    """A PNG that is all header: 8-bit grayscale of any claimed size, no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")).decode()


@pytest.mark.parametrize("payload", [
    "",  # no mask
    "not base64 at all!",
    base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode(),
    _png(np.zeros((40, 56), np.uint8), fmt="JPEG"),  # not a PNG
    _png(np.zeros((40, 56, 3), np.uint8)),  # RGB, not grayscale
    _png(np.full((40, 56), 60000, np.uint16)),  # 16-bit: values past 1 once scaled
    _png(np.zeros((56, 40), np.uint8)),  # transposed: wrong size
    _png(np.zeros((4000, 4000), np.uint8)),  # far more pixels than the challenge: refused from the header
    _png_header(20000, 20000),  # 88 bytes whose header trips Pillow's own bomb guard as the header is read
    "A" * (MAX_MASK_BYTES * 2),  # oversized payload: refused before decoding
])
def test_bad_masks_are_no_mask(payload):
    assert decode_mask(payload, (40, 56)) is None
    assert score_mask(payload, np.zeros((40, 56), np.float32)) is None


def test_non_string_masks_never_fail_the_answer():
    answer = ImageSynapse(**{"image": "aGk=", "prediction": 0.7, "mask": {"evil": [1, 2]}})
    assert answer.prediction == 0.7 and answer.mask == ""
    answer.mask = None
    assert answer.mask == "" and decode_mask(None, (4, 4)) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [np.full((4, 4), 1.5), np.full((4, 4), -0.1), np.full((4, 4), np.nan), np.zeros(4)])
def test_encoding_refuses_maps_outside_the_unit_range(bad):
    with pytest.raises(ValueError):
        encode_mask(bad)


# --- regions, splicing and the cache ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [(256, 256), (97, 31), (8, 8), (1, 1)])
def test_region_masks_cover_the_drawn_share_with_a_soft_edge(shape, size):
    rng = np.random.default_rng(3)
    for _ in range(3):
        mask = random_region_mask(size, rng, shape=shape)
        assert mask.shape == (size[1], size[0]) and 0.0 <= mask.min() and mask.max() <= 1.0
        assert (mask > 0.5).any()  # never empty
        if min(size) >= 64:
            assert 0.03 <= float(mask.mean()) <= 0.55
            assert ((mask > 0.02) & (mask < 0.98)).any()  # feathered
    with pytest.raises(ValueError):
        random_region_mask((10, 10), rng, area=(0.6, 0.2))


def test_splice_keeps_real_pixels_outside_the_region_and_donor_pixels_inside():
    rng = np.random.default_rng(1)
    real = Image.fromarray(np.full((48, 64, 3), 200, np.uint8))
    donor = Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))
    image, mask = make_semi_synthetic(real, donor, rng)
    pixels = np.asarray(image).astype(int)
    assert image.size == real.size and mask.shape == (48, 64)
    assert (pixels[mask == 0] == 200).all()
    region = pixels[mask > 0.99]
    assert region.std() > 10  # the donor's texture stays, even over a flat real area
    assert abs(region.mean() - 200) < 15  # but its colour is matched to the real image's


def test_cache_stores_masks_beside_images_and_removes_them_together(tmp_path):
    cache = ImageCache(tmp_path, max_items=2)
    rng = np.random.default_rng(0)
    image = dark_image(rng, 30)
    mask = random_region_mask(image.size, rng)
    cache.put(image, {"kind": SEMI_SYNTHETIC}, mask=mask)
    image, metadata, loaded = cache.sample_with_mask(rng)
    assert metadata["kind"] == SEMI_SYNTHETIC and np.abs(loaded - mask).max() <= 0.5 / 255 + 1e-6
    item = cache.items()[0]
    assert item.mask_path.name.endswith(MASK_SUFFIX) and item.nbytes > item.sidecar_path.stat().st_size
    with pytest.raises(ValueError, match="does not fit"):
        cache.put(dark_image(rng, 30), {}, mask=np.zeros((5, 5)))
    cache.put(dark_image(rng, 30), {})  # a whole image: no mask
    cache.put(dark_image(rng, 30), {})  # evicts the masked item, mask file included
    assert not list(tmp_path.glob(f"*{MASK_SUFFIX}")) and len(cache) == 2
    assert cache.sample_with_mask(rng)[2] is None


def test_a_broken_mask_file_removes_the_item_instead_of_failing(tmp_path, caplog):
    cache = ImageCache(tmp_path)
    rng = np.random.default_rng(0)
    image = dark_image(rng, 30)
    cache.put(image, {}, mask=random_region_mask(image.size, rng))
    next(tmp_path.glob(f"*{MASK_SUFFIX}")).write_bytes(mask_to_png(np.zeros((7, 7))))  # wrong size
    with caplog.at_level(logging.WARNING):
        assert cache.sample_with_mask(rng) is None
    assert "unreadable mask" in caplog.text and len(cache) == 0 and not list(tmp_path.glob("[!.]*"))


def test_semi_synthetic_seed_from_the_packaged_samples(tmp_path):
    count = seed_semi_synthetic_cache(
        tmp_path, packaged_real_sample().path, packaged_synthetic_sample(), count=5, seed=2
    )
    cache = ImageCache(tmp_path)
    assert count == 5 == len(cache)
    image, metadata, mask = cache.sample_with_mask(np.random.default_rng(0))
    assert metadata["kind"] == SEMI_SYNTHETIC and mask.shape == (image.height, image.width)
    assert metadata["mask_area"] == pytest.approx(float(mask.mean()), abs=0.01)


# --- the challenge mix --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("0.5,0.5", "three weights"), ("a,1,1", "not a number"), ("-1,1,1", ">= 0"), ("nan,1,1", ">= 0"),
    ("0,0,0", "more than 0"), ("inf,0,1", ">= 0"),
])
def test_challenge_probs_are_checked(text, message):
    with pytest.raises(ValueError, match=message):
        parse_challenge_probs(text)


def test_challenge_probs_flag_errors_at_start(tmp_path):
    from neurons.validator import build_parser, check_config
    from bitmind.config import build_config

    config = build_config(build_parser(), ["--challenge.probs", "1,2"])
    assert any(problem.startswith("--challenge.probs: expected three weights") for problem in check_config(config))
    config = build_config(build_parser(), ["--challenge.probs", "2,1,1"])
    assert check_config(config) == []


def _semi_cache(folder, count=6, seed=0) -> ImageCache:
    """Bright 'real' images with a dark region blended in through a random soft mask (no colour matching: the
    test miners find the generated pixels by their darkness)."""
    cache = ImageCache(folder)
    rng = np.random.default_rng(seed)
    for _ in range(count):
        real = Image.fromarray(rng.integers(190, 256, (96, 112, 3), dtype=np.uint8))
        mask = random_region_mask(real.size, rng, area=(0.2, 0.5))
        cache.put(composite(real, dark_image(rng), mask), {"kind": SEMI_SYNTHETIC, "model": "paste"}, mask=mask)
    return cache


def test_sampler_draws_each_kind_with_its_truth_mask(tmp_path):
    synthetic = SyntheticImageSource(fill_synthetic_cache(tmp_path / "synthetic"))
    semi = SyntheticImageSource(_semi_cache(tmp_path / "semi"), kind=SEMI_SYNTHETIC)
    sampler = ChallengeSampler(BrightSource(), synthetic, Augmenter({1: 1.0}), semi_synthetic=semi,
                               kind_probs={"real": 1, "synthetic": 1, "semi-synthetic": 2})
    rng = np.random.default_rng(5)
    seen = {kind: 0 for kind in KINDS}
    for _ in range(40):
        challenge = sampler.sample(rng)
        seen[challenge.kind] += 1
        assert challenge.mask.shape == (256, 256) and challenge.metadata["kind"] == challenge.kind
        assert challenge.label == (challenge.kind != "real")  # semi-synthetic counts as generated
        if challenge.kind == SEMI_SYNTHETIC:
            dark = np.asarray(challenge.image, dtype=np.float32).mean(axis=2) < 128
            # the augmentation moved the mask with the image: it still marks the dark (generated) region
            assert mask_overlap(dark.astype(np.float32), challenge.mask).iou > 0.8
        else:
            assert (challenge.mask == challenge.label).all()
    assert seen[SEMI_SYNTHETIC] > seen["real"] > 0 and seen["synthetic"] > 0


def test_semi_synthetic_share_falls_back_to_synthetic_and_says_so_once(tmp_path, caplog):
    synthetic = SyntheticImageSource(fill_synthetic_cache(tmp_path / "synthetic"))
    empty = SyntheticImageSource(tmp_path / "semi", kind=SEMI_SYNTHETIC)
    sampler = ChallengeSampler(BrightSource(), synthetic, Augmenter(), semi_synthetic=empty,
                               kind_probs={"semi-synthetic": 1})
    with caplog.at_level(logging.WARNING):
        kinds = [sampler.sample(np.random.default_rng(i)).kind for i in range(3)]
    assert kinds == ["synthetic"] * 3 and caplog.text.count("semi-synthetic cache") == 1
    # no semi-synthetic source at all: its share goes to the other generated kind
    assert ChallengeSampler(BrightSource(), synthetic, kind_probs={"semi-synthetic": 1}).kind_probs["synthetic"] == 1
    assert kind_probs_from_fake_prob(0.5)["real"] == 0.5


# --- wire compatibility ---------------------------------------------------------------------------------------
def _pre_mask_synapse() -> type[bt.Synapse]:
    """ImageSynapse as miners that know nothing of masks define it (the class before the `mask` field)."""

    class ImageSynapse(bt.Synapse):  # noqa: N801 - the wire name
        image: str = pydantic.Field(default="")
        prediction: float = pydantic.Field(default=-1.0)

        def deserialize(self) -> float:
            return self.prediction

    return ImageSynapse


class _HttpAnswer:
    status = 200
    headers = {"bt_header_axon_status_code": "200", "bt_header_axon_status_message": "Success",
               "bt_header_dendrite_process_time": "0.2"}


def test_miners_without_masks_parse_requests_and_are_scored_as_before(tmp_path):
    old_class = _pre_mask_synapse()
    request = ImageSynapse(image="aGVsbG8=")
    seen_by_old_miner = old_class(**json.loads(json.dumps(request.model_dump())))  # the axon's parse of the body
    assert seen_by_old_miner.body_hash == request.body_hash  # the signed hash still verifies
    assert seen_by_old_miner.to_headers().keys() == request.to_headers().keys()
    seen_by_old_miner.prediction = 0.8

    dendrite = _Dendrite(make_wallet(tmp_path, "v"), LOOPBACK)
    rewards = []
    for answer_body in (seen_by_old_miner.model_dump(), {**seen_by_old_miner.model_dump(), "mask": ""}):
        local = ImageSynapse(image="aGVsbG8=")
        local.dendrite, local.axon = bt.TerminalInfo(), bt.TerminalInfo()
        dendrite.process_server_response(_HttpAnswer(), json.loads(json.dumps(answer_body)), local)  # bittensor's
        response = _to_response(local, TEST_TIMEOUT)
        assert (response.status, response.prediction, response.mask) == (200, 0.8, "")
        assert score_mask(response.mask, np.ones((8, 8), np.float32)) is None
        rewards.append(compute_reward(1, response.prediction, deque()))
    assert rewards[0] == rewards[1]

    # and a validator that knows nothing of masks reads a masked answer's prediction unchanged
    masked = ImageSynapse(image="", prediction=0.8, mask=encode_mask(np.ones((8, 8))))
    assert old_class(**json.loads(json.dumps(masked.model_dump()))).prediction == 0.8


# --- a step against miners that return masks ------------------------------------------------------------------
def _dark_share(synapse: ImageSynapse) -> tuple[float, np.ndarray]:
    from bitmind.image_codec import decode_image

    dark = np.asarray(decode_image(synapse.image), dtype=np.float32).mean(axis=2) < 128
    return float(dark.mean()), dark


async def segmenter(synapse: ImageSynapse) -> ImageSynapse:
    """Finds the dark (generated) pixels; says generated when any notable dark region is there."""
    share, dark = _dark_share(synapse)
    synapse.prediction = 1.0 if share > 0.02 else 0.0
    synapse.mask = encode_mask(dark)
    return synapse


async def same_without_mask(synapse: ImageSynapse) -> ImageSynapse:
    synapse.prediction = 1.0 if _dark_share(synapse)[0] > 0.02 else 0.0
    return synapse


class BadMasks:
    """The same predictions, with a different broken mask each time."""

    def __init__(self) -> None:
        self.payloads = [
            _png(np.zeros((255, 256), np.uint8)),  # wrong size
            "!!not-base64!!",
            "A" * (MAX_MASK_BYTES * 2),  # huge
            _png(np.zeros((256, 256, 3), np.uint8)),  # not grayscale
        ]
        self.calls = 0

    async def __call__(self, synapse: ImageSynapse) -> ImageSynapse:
        synapse.prediction = 1.0 if _dark_share(synapse)[0] > 0.02 else 0.0
        synapse.mask = self.payloads[self.calls % len(self.payloads)]
        self.calls += 1
        return synapse


def test_masks_are_scored_apart_and_never_change_the_reward(tmp_path, monkeypatch):
    import bittensor.utils.networking as networking

    monkeypatch.setattr(networking, "get_external_ip", lambda: LOOPBACK)
    bad = BadMasks()
    fleet = start_fleet(tmp_path / "fleet", {"segmenter": segmenter, "plain": same_without_mask, "bad": bad})
    subnet = build_subnet(tmp_path, fleet)
    client = ValidatorClient(subnet.validator, external_ip=LOOPBACK)
    try:
        scorer = Scorer(alpha=0.3)
        view = subnet.chain.sync()
        scorer.sync(view)
        semi = SyntheticImageSource(_semi_cache(tmp_path / "semi"), kind=SEMI_SYNTHETIC)
        sampler = ChallengeSampler(BrightSource(), None, Augmenter({0: 1.0, 1: 1.0}), semi_synthetic=semi,
                                   kind_probs={"real": 1, "semi-synthetic": 1})
        runner = ChallengeRunner(sampler, scorer, client.query_sync, subnet.validator.hotkey.ss58_address,
                                 ForwardParams(timeout=5.0), np.random.default_rng(2))
        uid = {name: subnet.uids[name] for name in ("segmenter", "plain", "bad")}
        kinds, ious = set(), []
        for step in range(6):
            result = runner.run(view)
            kinds.add(result.challenge.kind)
            by_uid = {u: (resp, reward, score) for u, resp, reward, score in
                      zip(result.uids, result.responses, result.rewards, result.mask_scores, strict=True)}
            seg, plain, broken = by_uid[uid["segmenter"]], by_uid[uid["plain"]], by_uid[uid["bad"]]
            assert seg[0].status == plain[0].status == broken[0].status == 200
            assert seg[1] == plain[1] == broken[1]  # identical rewards: the mask never counts
            assert plain[2] is None and broken[2] is None  # no mask / bad mask: "no mask"
            ious.append(seg[2].iou)
            line = format_step(step + 1, result, [], runner.stats)
            assert f"({result.challenge.kind})" in line and "masks 1" in line
        assert kinds == {"real", SEMI_SYNTHETIC}
        assert min(ious) > 0.7  # the segmenter's masks match the truth (IoU 1 when both are empty)
        assert bad.calls == 6
        summary = runner.stats.summary()
        assert summary[SEMI_SYNTHETIC]["challenges"] + summary["real"]["challenges"] == 6
        assert summary[SEMI_SYNTHETIC]["accuracy"] == 1.0 and summary[SEMI_SYNTHETIC]["masks"] >= 1
        assert scorer.scores[uid["segmenter"]] == scorer.scores[uid["plain"]] == scorer.scores[uid["bad"]] > 0
    finally:
        client.close()
        subnet.close()
        fleet.stop()


def test_tally_counts_only_valid_answers():
    tally = tally_step(1, [0.9, 0.2, -1.0, float("nan"), 0.7], [200, 200, 200, 200, 408], [None] * 5)
    assert (tally.answers, tally.correct, tally.accuracy) == (2, 1, 0.5)
    stats = ChallengeStats(window=2)
    for _ in range(3):
        stats.record(SEMI_SYNTHETIC, tally)
    assert stats.summary()[SEMI_SYNTHETIC]["challenges"] == 2 and "semi-synthetic=0.500" in stats.format()
    with pytest.raises(ValueError):
        stats.record("video", tally)


def test_mask_from_png_rejects_other_sizes_before_decoding():
    raw = mask_to_png(np.zeros((10, 12)))
    assert mask_from_png(raw, (10, 12)).shape == (10, 12)
    with pytest.raises(ValueError, match="expected 12x11"):
        mask_from_png(raw, (11, 12))


# --- the local demo ---------------------------------------------------------------------------------------------
def test_localnet_seeds_semi_synthetic_items_and_shows_accuracy_per_kind(tmp_path):
    from bitmind.console import Console
    from validator.localnet.flags import SEMI_SEED_ITEMS, build_parser
    from validator.localnet.network import Localnet
    from validator.localnet.report import kind_line, kind_stats

    args = build_parser().parse_args(["--semi-synthetic", "--workdir", str(tmp_path / "net"), "--seed", "3"])
    net = Localnet(args, Console(io.StringIO()))
    try:
        net._seed_cache()
        cache = ImageCache(net.semi_cache)
        assert len(cache) == SEMI_SEED_ITEMS and all(item.mask_path for item in cache.items())
        assert kind_stats(net.validator_state) == {}  # no validator heartbeat yet
        net.validator_state.mkdir(parents=True)
        (net.validator_state / "heartbeat.json").write_text(json.dumps({"kinds": {
            "real": {"challenges": 4, "accuracy": 0.75}, "synthetic": {"challenges": 0, "accuracy": None},
            "semi-synthetic": {"challenges": 2, "accuracy": None}, "video": "garbage",
        }}))
        line = kind_line(kind_stats(net.validator_state))
        assert line == "miners' accuracy by kind: real 0.75 (4 challenges), semi-synthetic - (2 challenges)"
    finally:
        net.close()
    assert kind_line({"real": {"challenges": "many"}}) == "" and kind_line({}) == ""
