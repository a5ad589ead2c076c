"""Validator side of video challenges: reading video files, clip sources and cache, clip sampling, clip-consistent
augmentation, the video sampler, per-modality scoring and a step that sends a clip to real miners on 127.0.0.1."""

import asyncio
import io
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitmind.chain.local import LocalChain
from bitmind.config import build_config, new_parser
from bitmind.protocol import ImageSynapse, VideoSynapse
from bitmind.transport import MinerServer, Response, ValidatorClient
from bitmind.video_codec import VideoDecodeError, decode_clip, encode_clip
from tests._fixtures_validator import TEST_TIMEOUT, BrightSource, fleet  # noqa: F401 (a fixture)
from tests._wallets import LOOPBACK, make_wallet
from bitmind.ports import free_port
from validator.augment import Augmenter
from validator.challenges import ChallengeSampler
from validator.forward import ChallengeRunner, ForwardParams, format_step
from validator.reward import AnswerKind, window_reward
from validator.scoring import Scorer, add_scoring_args, modality_weights
from validator.state import ScorerState
from validator.video.augment import ClipAugmenter
from validator.video.cache import ClipCache
from validator.video.challenge import VideoChallengeSampler
from validator.video.config import VideoChallenges, add_video_args, check_video_config
from validator.video.container import read_video
from validator.video.sampling import ClipParams, ClipSampler
from validator.video.sources import SyntheticVideoSource, VideoClipSource, iter_video_files

pytestmark = pytest.mark.timeout(120)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"
needs_shared = pytest.mark.skipif(not (SHARED / "metadata.csv").is_file(), reason="shared video clips not present")


def _clip(frames: int = 16, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Frames with a moving bright square on noise: consecutive frames differ, so index mix-ups show."""
    rng = np.random.default_rng(seed)
    clip = rng.integers(0, 60, (frames, height, width, 3), dtype=np.uint8)
    for index in range(frames):
        left = (index * 3) % (width - 8)
        clip[index, 10:18, left:left + 8] = 250
    return clip


def _mp4(frames: np.ndarray, fps: int = 8) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


# --- reading video files ----------------------------------------------------------------------------------------
def test_read_video_decodes_scales_and_takes_a_segment():
    data = _mp4(_clip(24, 48, 64), fps=8)
    video = read_video(data, max_seconds=10, max_side=32)
    assert video.frames.shape == (24, 24, 32, 3) and video.fps == 8.0 and video.source_size == (64, 48)
    segment = read_video(data, max_seconds=1.0, max_side=64, start_s=1.0)
    assert len(segment.frames) == 8 and segment.start_s == pytest.approx(1.0)
    starts = {read_video(data, max_seconds=1.0, start_s=None, rng=np.random.default_rng(s)).start_s for s in range(6)}
    assert len(starts) > 1 and all(0 <= s <= 2.0 for s in starts)


@pytest.mark.parametrize("data", [b"", b"not a video at all" * 10, b"\x00" * 4096, "jpeg", "truncated"])
def test_read_video_refuses_what_is_not_a_video(data):
    if data == "jpeg":
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buffer, format="JPEG")
        data = buffer.getvalue()
    elif data == "truncated":
        data = _mp4(_clip(16))[:600]
    with pytest.raises(VideoDecodeError):
        read_video(data)


def test_read_video_refuses_oversized_files():
    with pytest.raises(VideoDecodeError, match="limit"):
        read_video(_mp4(_clip(8)), max_bytes=100)


# --- clip sampling ------------------------------------------------------------------------------------------------
def test_clips_stay_in_the_ranges_by_time_without_repeated_frames():
    sampler = ClipSampler()
    rng = np.random.default_rng(0)
    index_frames = np.arange(120, dtype=np.uint8).reshape(120, 1, 1, 1).repeat(3, axis=-1).repeat(2, 1).repeat(2, 2)
    for source_fps in (30.0, 8.0, 4.0):
        for _ in range(40):
            clip = sampler.sample(rng, index_frames[: int(source_fps * 4)], source_fps)
            assert clip is not None
            indices = clip.frames[:, 0, 0, 0].astype(int)
            assert clip.fps <= source_fps and (clip.fps >= 8.0 or clip.fps == source_fps)
            assert 4 <= len(indices) <= 24 and (len(indices) - 1) / clip.fps <= 2.0 + 1e-9
            assert np.all(np.diff(indices) >= 1)  # time order, no frame shown twice
            assert clip.info["indices"] == indices.tolist()


def test_a_video_too_short_gives_no_clip():
    assert ClipSampler().sample(np.random.default_rng(0), _clip(3), 8.0) is None


def test_splice_joins_two_videos_at_one_size_and_rate():
    sampler = ClipSampler(ClipParams(splice_prob=1.0))
    rng = np.random.default_rng(1)
    first, second = _clip(32, 48, 64, seed=1), np.full((40, 30, 90, 3), 200, dtype=np.uint8)
    for _ in range(10):
        clip = sampler.splice(rng, (first, 8.0), (second, 24.0))
        cut = clip.info["splice_at"]
        assert clip.frames.shape[1:] == (48, 64, 3) and clip.fps <= 8.0
        assert 2 <= cut <= len(clip.frames) - 2
        assert np.all(clip.frames[cut:] == 200) and not np.all(clip.frames[:cut] == 200)


def test_a_splice_never_repeats_a_frame_of_its_faster_shorter_video():
    """The faster video has fewer frames: each part must fit in its own video at the common rate (the plan once
    took the slower rate with the smaller frame count, and the faster video's last frame froze)."""
    sampler = ClipSampler(ClipParams(splice_prob=1.0))
    numbered = lambda count: np.arange(count, dtype=np.uint8).reshape(count, 1, 1, 1).repeat(3, -1).repeat(2, 1).repeat(2, 2)  # noqa: E731
    for seed in range(40):
        clip = sampler.splice(np.random.default_rng(seed), (numbered(30), 30.0), (numbered(90), 10.0))
        if clip is None:
            continue
        for part in clip.info["parts"]:
            assert np.all(np.diff(part["indices"]) >= 1), (seed, part)  # time order, no frame shown twice


@pytest.mark.parametrize("bad", [dict(min_frames=2), dict(min_frames=30), dict(min_fps=0), dict(splice_prob=1.5),
                                 dict(max_window_s=0)])
def test_clip_params_are_checked(bad):
    with pytest.raises(ValueError):
        ClipParams(**bad)


# --- clip-consistent augmentation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_frame_gets_the_same_augmentation(level):
    still = np.repeat(_clip(1, 80, 100), 6, axis=0)  # six identical frames
    augmenter = ClipAugmenter(Augmenter(size=64))
    frames, description = augmenter(still, np.random.default_rng(level), level)
    assert frames.shape == (6, 64, 64, 3) and description["level"] == level
    assert all(np.array_equal(frames[0], frame) for frame in frames[1:])
    moving = _clip(6, 80, 100)  # a real clip: frames differ, and so do their augmented versions
    augmented, _ = augmenter(moving, np.random.default_rng(level), level)
    assert not np.array_equal(augmented[0], augmented[5])
    assert augmenter.seconds > 0


def test_clip_augmenter_refuses_non_clips():
    with pytest.raises(ValueError):
        ClipAugmenter(Augmenter(size=64))(np.zeros((0, 8, 8, 3), np.uint8), np.random.default_rng(0))


# --- clip cache ---------------------------------------------------------------------------------------------------
def test_a_clip_too_large_for_a_readable_sheet_is_stored_smaller_not_lost(tmp_path, monkeypatch):
    """The cache's readers refuse (and delete) images over ITEM_MAX_PIXELS: a clip whose sheet would be larger is
    stored at a scale that fits, and the image cache refuses to store what its readers would delete."""
    from validator.challenges import cache as image_cache
    from validator.video import cache as clip_cache

    limit = 128 * 128
    monkeypatch.setattr(image_cache, "ITEM_MAX_PIXELS", limit)
    monkeypatch.setattr(clip_cache, "ITEM_MAX_PIXELS", limit)
    cache = ClipCache(tmp_path / "clips")
    cache.put(_clip(20, 48, 64), 8.0, {"source": "big"})  # 8 x 3 frames of 64x48: 73,728 pixels
    (frames, fps), metadata = cache.sample(np.random.default_rng(0))
    assert len(frames) == 20 and fps == 8.0 and metadata["clip"]["scaled_from"] == [64, 48]
    assert 8 * 3 * frames.shape[1] * frames.shape[2] <= limit and len(cache) == 1
    with pytest.raises(ValueError, match="limit a reader of the cache applies"):
        cache.images.put(Image.new("RGB", (200, 100)), {})


def test_clip_cache_round_trip_and_broken_items(tmp_path, caplog):
    cache = ClipCache(tmp_path / "clips")
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)[None, None, :, None]  # smooth like video frames, not noise
    frames = np.broadcast_to(ramp, (11, 48, 64, 3)).copy()
    frames[:, 10:20, :, 1] = np.arange(11, dtype=np.uint8)[:, None, None] * 20
    cache.put(frames, 12.5, {"source": "test"})
    (loaded, fps), metadata = cache.sample(np.random.default_rng(0))
    assert loaded.shape == frames.shape and fps == 12.5 and metadata["source"] == "test"
    assert np.abs(loaded.astype(int) - frames.astype(int)).mean() < 3  # JPEG q95
    # an image whose grid does not match is not a clip: skipped, removed, logged
    cache.images.put(Image.new("RGB", (64, 48)), {"clip": {"frames": 5, "fps": 8, "width": 64, "height": 48,
                                                           "columns": 5}})
    with caplog.at_level(logging.WARNING):
        drawn = [cache.sample(np.random.default_rng(seed)) for seed in range(6)]
    assert all(item is not None for item in drawn) and len(cache) == 1
    assert "not a clip sheet" in caplog.text
    for bad in (np.zeros((4, 8, 8), np.uint8), np.zeros((0, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), float)):
        with pytest.raises(ValueError):
            cache.put(bad, 8.0, {})
    with pytest.raises(ValueError):
        cache.put(frames, float("nan"), {})


# --- sources ------------------------------------------------------------------------------------------------------
@needs_shared
def test_shared_folder_with_metadata_csv_fills_a_real_source(tmp_path):
    source = VideoClipSource([f"{SHARED}?labels=0"], tmp_path / "cache", fill_batch=2, seed=0, max_side=256)
    assert source.fill_round() == 2
    (frames, fps), label, metadata = source.sample(np.random.default_rng(0))
    assert label == 0 and frames.ndim == 4 and max(frames.shape[1:3]) <= 256 and fps > 0
    assert metadata["fields"]["label"] == "0" and "/real/" in metadata["file"]
    generated = VideoClipSource([f"{SHARED}?labels=1"], tmp_path / "gen", label=1, fill_batch=1, seed=0)
    generated.fill_round()
    assert generated.sample(np.random.default_rng(0))[1] == 1
    assert "/generated/" in generated.sample(np.random.default_rng(0))[2]["file"]


def test_folder_and_zip_sources_skip_corrupt_files(tmp_path, caplog):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "good.mp4").write_bytes(_mp4(_clip(16)))
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    with zipfile.ZipFile(folder / "bundle.zip", "w") as bundle:
        bundle.writestr("a/clip.mp4", _mp4(_clip(12, seed=2)))
        bundle.writestr("a/broken.webm", b"not a webm")
        bundle.writestr("a/readme.txt", b"skipped: not a video")
    keys = [key for key, _, _ in iter_video_files(VideoClipSource([str(folder)], tmp_path / "c").specs[0], 0)]
    assert len(keys) == 4 and any(key.endswith("bundle.zip!a/clip.mp4") for key in keys)
    source = VideoClipSource([str(folder)], tmp_path / "cache", fill_batch=10, seed=0)
    with caplog.at_level(logging.WARNING):
        assert source.fill_round() == 2
    assert source.status()[0]["bad_rows"] == 2 and source.status()[0]["failures"] == 0
    assert "skipping" in caplog.text and "corrupt.mp4" in caplog.text


def test_unusable_sources_fail_clearly_and_back_off(tmp_path):
    csv_folder = tmp_path / "csv"
    csv_folder.mkdir()
    (csv_folder / "metadata.csv").write_text("file,label\nx.mp4,0\n")
    (tmp_path / "empty").mkdir()
    source = VideoClipSource([str(csv_folder), str(tmp_path / "empty"), str(tmp_path / "missing")],
                             tmp_path / "cache", seed=0)
    assert source.fill_round() == 0
    errors = {status["source"]: status["last_error"] for status in source.status()}
    assert "no 'path' column" in errors["tmp_path0/csv".replace("tmp_path0", tmp_path.name)]
    assert all(status["failures"] == 1 for status in source.status())
    with pytest.raises(ValueError, match="labels"):
        list(iter_video_files(VideoClipSource([f"{tmp_path / 'empty'}?labels=0"], tmp_path / "c2").specs[0], 0))


def test_csv_rows_with_unsafe_paths_are_skipped(tmp_path, caplog):
    folder = tmp_path / "set"
    (folder / "clips").mkdir(parents=True)
    (folder / "clips" / "ok.mp4").write_bytes(_mp4(_clip(12)))
    (folder / "metadata.csv").write_text("path,label\n../../etc/passwd,0\n/abs.mp4,0\nclips/ok.mp4,0\n")
    with caplog.at_level(logging.WARNING):
        keys = [key for key, _, _ in iter_video_files(VideoClipSource([str(folder)], tmp_path / "c").specs[0], 1)]
    assert len(keys) == 1 and keys[0].endswith("clips/ok.mp4") and "unsafe path" in caplog.text


# --- the video challenge sampler ----------------------------------------------------------------------------------
class _Clips:
    def __init__(self, label: int, count: int = 3, frames: int = 20) -> None:
        self.label, self.items = label, [(_clip(frames, 48, 64, seed=i), 8.0) for i in range(count)]

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, rng):
        if not self.items:
            return None
        return self.items[int(rng.integers(len(self.items)))], self.label, {"source": f"label{self.label}"}


def test_video_sampler_builds_augmented_clips_and_needs_both_classes(caplog):
    augmenter = ClipAugmenter(Augmenter(size=64))
    one_class = VideoChallengeSampler(_Clips(0), _Clips(1, count=0), augmenter, fake_probability=0.0)
    with caplog.at_level(logging.WARNING):
        assert one_class.sample(np.random.default_rng(0)) is None  # real clips only would pay "always real"
    assert "no generated video clip cached" in caplog.text
    assert VideoChallengeSampler(_Clips(0), None, augmenter, fake_probability=0.0).sample(np.random.default_rng(0)) is None
    sampler = VideoChallengeSampler(_Clips(0), _Clips(1), augmenter, ClipSampler(ClipParams(splice_prob=1.0)),
                                    fake_probability=0.0)
    challenge = sampler.sample(np.random.default_rng(0))
    assert challenge.label == 0 and challenge.kind == "real"
    assert challenge.frames.shape[1:] == (64, 64, 3) and 4 <= len(challenge.frames) <= 24
    assert challenge.metadata["modality"] == "video" and "splice_at" in challenge.metadata["clip"]
    assert challenge.metadata["augmentation"]["level"] in (0, 1, 2, 3) and challenge.mask is None
    generated = VideoChallengeSampler(_Clips(0), _Clips(1), augmenter, fake_probability=1.0)
    assert generated.sample(np.random.default_rng(1)).kind == "synthetic"
    no_real = VideoChallengeSampler(_Clips(0, count=0), _Clips(1), augmenter, fake_probability=1.0)
    with caplog.at_level(logging.WARNING):
        assert [no_real.sample(np.random.default_rng(seed)) for seed in range(5)] == [None] * 5  # nor "always fake"
    assert caplog.text.count("no real video clip cached") == 1  # once per warn_interval_s
    too_short = VideoChallengeSampler(_Clips(0, frames=2), _Clips(1, frames=2), augmenter)
    assert too_short.sample(np.random.default_rng(0)) is None


def test_synthetic_video_source_reads_the_generator_cache(tmp_path):
    cache = ClipCache(tmp_path / "gen")
    source = SyntheticVideoSource(cache)
    assert source.sample(np.random.default_rng(0)) is None
    cache.put(_clip(8), 8.0, {"model": "tiny"})
    (frames, fps), label, metadata = source.sample(np.random.default_rng(0))
    assert label == 1 and metadata["source_type"] == "synthetic" and metadata["model"] == "tiny" and len(frames) == 8


# --- per-modality scoring -----------------------------------------------------------------------------------------
def _scorer(weights=None) -> Scorer:
    from bitmind.chain.base import MetagraphView

    scorer = Scorer(alpha=1.0, weights=weights)
    scorer.sync(MetagraphView(netuid=34, block=1, uids=[0, 1, 2], hotkeys=["a", "b", "c"], coldkeys=["x"] * 3,
                              stake=[0.0] * 3, validator_permit=[False] * 3, axons=[None] * 3))
    return scorer


def test_reward_combines_modalities_by_the_mix_weights():
    scorer = _scorer(modality_weights(0.05))
    for step in range(20):
        label = step % 2
        scorer.score_challenge(label, [0, 1], [0.9 * label + 0.05, 0.9 * label + 0.05], modality="image")
        scorer.score_challenge(label, [0, 1], [0.9 * label + 0.05, -1], modality="video")
    # miner 0 is perfect on both: reward 1; miner 1 refuses video: its image rewards top out at the image weight
    image = scorer.score_challenge(1, [0, 1], [0.99, 0.99], modality="image")
    assert image[0].value == pytest.approx(1.0) and image[1].value == pytest.approx(0.95)
    refusal = scorer.score_challenge(1, [0, 1], [0.99, -1], modality="video")
    assert refusal[1].kind is AnswerKind.NO_ANSWER and refusal[1].value == 0.0
    assert scorer.stats(1).video_history_len == 0 and scorer.stats(0).video_history_len == 21
    assert scorer.stats(0).video_accuracy == 1.0 and scorer.stats(0).video_mcc == pytest.approx(1.0)


@pytest.mark.parametrize("answer", ["0.7", 1.5, float("nan"), None, [0.5], True])
def test_bad_video_answers_are_invalid_like_image_ones(answer):
    scorer = _scorer(modality_weights(0.5))
    rewards = scorer.score_challenge(1, [0, 1], [answer, 0.8], modality="video")
    assert rewards[0].kind is AnswerKind.INVALID and rewards[0].value == 0.0
    assert rewards[1].kind is AnswerKind.VALID  # one bad answer never fails the batch
    history = scorer._records["b"].video_history
    assert rewards[1].value == pytest.approx(0.5 * window_reward(history)[0])  # image windows still empty


def test_video_histories_survive_a_snapshot_and_old_files_still_load():
    scorer = _scorer(modality_weights(0.05))
    scorer.score_challenge(1, [0], [0.8], modality="video")
    snapshot = ScorerState.model_validate_json(scorer.snapshot().model_dump_json())
    assert Scorer.from_snapshot(snapshot).stats(0).video_history_len == 1
    old = {"step": 1, "scores": [0.0], "hotkeys": ["a"], "miners": {"a": {"history": [[1, 0.8]], "queried": 1,
                                                                          "answered": 1, "invalid": 0}}}
    restored = Scorer.from_snapshot(ScorerState.model_validate_json(json.dumps(old)))  # as StateStore reads files
    assert restored.stats(0).video_history_len == 0 and restored.stats(0).history_len == 1
    with pytest.raises(ValueError):
        scorer.score_challenge(1, [0], [0.8], modality="audio")
    for bad in ({"image": 0.0}, {"video": 2.0}, {"sound": 1.0}):
        with pytest.raises(ValueError):
            Scorer(weights=bad)


def test_video_flags_reach_the_scorer_and_are_checked():
    parser = new_parser("test")
    add_scoring_args(parser)
    add_video_args(parser)
    config = build_config(parser, ["--validator.video_share", "0.2"])
    assert Scorer.from_config(config).modality_weights == pytest.approx({"image": 0.8, "video": 0.2})
    assert Scorer.from_config(build_config(parser, [])).modality_weights == pytest.approx({"image": 0.95,
                                                                                           "video": 0.05})
    bad = build_config(parser, ["--validator.video_share", "1.5", "--validator.video_quality", "0",
                                "--validator.real_video_datasets", " , "])
    problems = " ".join(check_video_config(bad))
    assert "video_share" in problems and "video_quality" in problems and "real_video_datasets" in problems


# --- one step with a clip, against real miners on 127.0.0.1 -------------------------------------------------------
@pytest.fixture
def video_world(tmp_path):
    import bittensor.utils.networking as networking

    seen: list[tuple[int, int, int]] = []

    async def image_answer(synapse: ImageSynapse) -> ImageSynapse:
        synapse.prediction = 0.5
        return synapse

    def video_answer(value: float):
        async def forward(synapse: VideoSynapse) -> VideoSynapse:
            frames = await asyncio.to_thread(decode_clip, synapse.video)
            seen.append(frames.shape[:3])
            synapse.prediction = value
            return synapse

        return forward

    chain = LocalChain(tmp_path / "chain.sqlite", seconds_per_block=0.05)
    validator = make_wallet(tmp_path / "wallets", "validator")
    chain.register_hotkey(validator.hotkey.ss58_address, validator.coldkeypub.ss58_address, stake=10.0)
    servers = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(networking, "get_external_ip", lambda: LOOPBACK)
        for name, video in (("video", video_answer(0.9)), ("image_only", None), ("bad_video", video_answer(1.7))):
            wallet = make_wallet(tmp_path / "wallets", name)
            servers[name] = MinerServer(wallet, free_port(), image_answer, external_ip=LOOPBACK,
                                        video_forward=video).start()
            chain.register_hotkey(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
            chain.serve_axon(wallet, LOOPBACK, servers[name].port)
    client = ValidatorClient(validator, external_ip=LOOPBACK)
    try:
        yield chain, validator, client, servers, seen
    finally:
        client.close()
        for server in servers.values():
            server.stop()
        chain.close()


def test_a_video_step_reaches_real_miners_and_scores_per_modality(video_world):
    chain, validator, client, servers, seen = video_world
    view = chain.sync()
    scorer = Scorer(alpha=0.5, weights=modality_weights(0.5))
    scorer.sync(view)
    images = ChallengeSampler(BrightSource(), None, Augmenter(size=64))
    video = VideoChallenges(
        VideoChallengeSampler(_Clips(0), _Clips(1), ClipAugmenter(Augmenter(size=64))), share=1.0, quality=75,
        real=None,
    )
    runner = ChallengeRunner(images, scorer, client.query_sync, validator.hotkey.ss58_address,
                             ForwardParams(sample_size=10, timeout=TEST_TIMEOUT), np.random.default_rng(0), video)
    result = runner.run(view)
    assert result.modality == "video" and seen and seen[0][1:] == (64, 64)
    kinds = {view.hotkeys[view.uids.index(uid)]: reward.kind for uid, reward in zip(result.uids, result.rewards)}
    assert kinds[servers["video"].hotkey] is AnswerKind.VALID
    assert kinds[servers["image_only"].hotkey] is AnswerKind.NO_ANSWER  # refuses video: scored 0, no penalty
    assert kinds[servers["bad_video"].hotkey] is AnswerKind.INVALID
    line = format_step(1, result, [], runner.stats, runner.video_stats)
    assert "video" in line and "video acc" in line
    assert result.timings.encoding > 0 and result.timings.augmentation > 0


def test_a_video_step_falls_back_to_an_image_while_no_clip_is_cached():
    sent = []

    def query(axons, payload, timeout, *synapse):
        sent.append(synapse)
        return [Response(200, 0.7, 0.01, "") for _ in axons]

    from bitmind.chain.base import MetagraphView
    import bittensor as bt

    axons = [bt.AxonInfo(version=1, ip=LOOPBACK, port=9000 + uid, ip_type=4, hotkey="h", coldkey="c")
             for uid in range(3)]
    view = MetagraphView(netuid=34, block=1, uids=[0, 1, 2], hotkeys=["me", "a", "b"], coldkeys=["c"] * 3,
                         stake=[0.0] * 3, validator_permit=[False] * 3, axons=axons)
    scorer = Scorer()
    scorer.sync(view)
    video = VideoChallenges(VideoChallengeSampler(_Clips(0, count=0), None, ClipAugmenter(Augmenter(size=64))),
                            share=1.0, quality=75, real=None)
    runner = ChallengeRunner(ChallengeSampler(BrightSource(), None, Augmenter(size=64)), scorer, query, "me",
                             rng=np.random.default_rng(0), video=video)
    result = runner.run(view)
    assert result.modality == "image" and sent == [()]
    frames = decode_clip(encode_clip(_clip(8, 64, 64)))
    assert frames.shape == (8, 64, 64, 3)


# --- the local demo's video option (the full run: `bitmind-localnet --video-share 0.3`, see the README) ----------
@pytest.mark.parametrize("argv", [["--video-share", "1.5"], ["--video-share", "-0.1"], ["--video-share", "x"]])
def test_localnet_video_share_is_checked(argv, capsys):
    from neurons.localnet import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "video-share" in capsys.readouterr().err


def test_localnet_without_clips_says_so_before_starting_anything(tmp_path, capsys):
    from neurons.localnet import main

    workdir = tmp_path / "work"
    assert main(["--video-share", "0.2", "--video-data", str(tmp_path / "no-clips"), "--workdir", str(workdir)]) == 1
    out = capsys.readouterr().out
    assert "--video-share 0.2 needs clips" in out and "metadata.csv not found" in out
    assert not workdir.exists() or not any(workdir.iterdir())


@needs_shared
def test_localnet_seeds_generated_clips_and_hands_the_validator_its_video_flags(tmp_path):
    from bitmind.console import Console
    from validator.localnet.flags import build_parser
    from validator.localnet.network import Localnet

    args = build_parser().parse_args(["--video-share", "0.25", "--workdir", str(tmp_path / "w"), "--seed", "3"])
    net = Localnet(args, Console(io.StringIO()))
    net._seed_video_cache()
    flags = net._video_flags()
    cache = ClipCache(flags[flags.index("--validator.synthetic_video_cache") + 1])
    assert len(cache) == 40 and f"{SHARED.resolve()}?labels=0" in flags
    (frames, fps), metadata = cache.sample(np.random.default_rng(0))
    assert metadata["fields"]["label"] == "1" and frames.ndim == 4


def test_leaderboard_shows_each_miners_video_figures():
    from validator.leaderboard import MinerInfo, build_leaderboard
    from validator.state import MinerRecordState, ValidatorState

    record = MinerRecordState(history=[(1, 0.9)], queried=4, answered=3,
                              video_history=[(1, 0.8), (0, 0.3), (1, 0.2)])
    state = ValidatorState(netuid=34, scorer=ScorerState(step=4, scores=[0.0, 0.4], hotkeys=["v", "hk"],
                                                         miners={"hk": record}))
    board = build_leaderboard(state, {}, [MinerInfo(1, "hk", "npr")])
    row = board.rows[0]
    assert row.video_answers == 3 and row.video_accuracy == pytest.approx(2 / 3) and row.accuracy == 1.0
    assert "video: uid 1 0.667 acc" in board.render() and board.summary()["miners"][0]["video_answers"] == 3
    empty = build_leaderboard(None, {}, [MinerInfo(1, "hk", "npr")])
    assert empty.rows[0].video_accuracy is None and "video:" not in empty.render()


def test_the_validator_process_sends_clips_its_flags_describe(tmp_path, fleet):  # noqa: F811 (a fixture)
    from bitmind.config import build_config as config_of
    from neurons.validator import Validator, build_parser
    from tests._fixtures_validator import build_subnet, validator_argv

    folder = tmp_path / "videos"
    folder.mkdir()
    for index in range(2):
        (folder / f"clip{index}.mp4").write_bytes(_mp4(_clip(20, seed=index)))
    subnet = build_subnet(tmp_path, fleet)
    argv = validator_argv(subnet, tmp_path, "--validator.video_share", "1", "--validator.real_video_datasets",
                          str(folder), "--validator.real_video_cache", str(tmp_path / "real_video"),
                          "--validator.synthetic_video_cache", str(tmp_path / "generated_video"))
    ClipCache(tmp_path / "generated_video").put(_clip(20, seed=5), 8.0, {"model": "tiny"})
    made = Validator(config_of(build_parser(), argv))
    try:
        assert made.scorer.modality_weights == {"video": 1.0}
        made.real_source.fill_round()
        assert made.step().modality == "image"  # no clip cached yet: an image challenge instead
        assert made.video.real.fill_round() == 2
        result = made.step()
        assert result.modality == "video" and result.challenge.frames.shape[1:] == (256, 256, 3)
        assert all(reward.kind is AnswerKind.NO_ANSWER for reward in result.rewards)  # these miners serve no video
        beat = json.loads((tmp_path / "state" / "heartbeat.json").read_text())
        assert beat["modality"] == "video" and beat["video_clips_cached"] == 2
        assert sum(kind["challenges"] for kind in beat["video_kinds"].values()) == 1
    finally:
        made.close()
        subnet.close()


def test_a_hub_dataset_is_read_through_the_hub_filesystem_by_archive_members(tmp_path, monkeypatch):
    """The hub branch: `datasets/<repo>` paths on `HfFileSystem` (here backed by a local folder laid out like
    shangxd/imagenet-vidvrd: zips of mp4s beside other files), archive members read one by one."""
    import huggingface_hub
    from fsspec.implementations.local import LocalFileSystem

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("a dataset card")
    with zipfile.ZipFile(repo / "videos-part1.zip", "w") as bundle:
        for index in range(3):
            bundle.writestr(f"videos/{index}.mp4", _mp4(_clip(12, seed=index)))
    opened = []

    class LocalHub(LocalFileSystem):
        def _local(self, path: str) -> str:
            assert path.startswith("datasets/org/vidvrd"), path
            return str(repo) + path[len("datasets/org/vidvrd"):]

        def isfile(self, path):
            return super().isfile(self._local(path))

        def find(self, path, **kwargs):
            return ["datasets/org/vidvrd" + found[len(str(repo)):] for found in super().find(self._local(path))]

        def open(self, path, mode="rb", **kwargs):
            opened.append(path)
            return super().open(self._local(path), mode)

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", LocalHub)
    source = VideoClipSource(["org/vidvrd"], tmp_path / "cache", fill_batch=2, seed=0)
    assert source.specs[0].is_hub and source.fill_round() == 2
    assert opened == ["datasets/org/vidvrd/videos-part1.zip"]  # one archive opened, members read from it
    assert "videos-part1.zip!videos/" in source.sample(np.random.default_rng(0))[2]["file"]
