"""Video challenges end to end on loopback: the miner process serving `VideoSynapse` next to `ImageSynapse` on one
axon (real LocalChain, wallets, Axon and Dendrite), with `--neuron.video_detector` choosing TALL or refusing video."""

import base64
import struct

import pytest

from bitmind.protocol import NO_ANSWER, ImageSynapse, VideoSynapse
from bitmind.transport import ValidatorClient
from bitmind.video_codec import FORMAT_PREFIX, encode_clip
from bitmind.video_file import read_video
from tests._required import shared_data
from tests.test_miner import VALIDATOR_IP, MinerHarness, _image
from tests.test_video_codec import ivf, ivf_packets, moving_clip


def _query(harness: MinerHarness, wallet, payloads: list[str], synapse_type=VideoSynapse):
    client = ValidatorClient(wallet, external_ip=VALIDATOR_IP)
    try:
        return client.query_sync([harness.axon()] * len(payloads), payloads, 9.0, synapse_type)
    finally:
        client.close()


def _hostile_clips() -> list[str]:
    """Garbage, a PNG image in the video field, thousands of frames, mixed frame sizes, and a huge payload."""
    _, big = ivf_packets(encode_clip(moving_clip()))
    _, small = ivf_packets(encode_clip(moving_clip(4, 32, 48)))
    png = base64.b64decode(_image(0))
    huge = FORMAT_PREFIX + base64.b64encode(
        struct.pack("<4sHH4sHHIIII", b"DKIF", 0, 32, b"AV01", 64, 64, 8, 1, 1, 0) + b"\0" * (9 * 1024 * 1024)
    ).decode()
    return [
        "!!!not-a-clip!!!",
        FORMAT_PREFIX + base64.b64encode(png).decode(),
        ivf([b"x"] * 3000),
        ivf(big + small, 96, 64),
        huge,
    ]


def test_tall_answers_clips_and_one_bad_clip_never_fails_the_batch(tmp_path):
    clip = encode_clip(read_video(sorted(shared_data("video/clips/real").glob("*.mp4"))[0])[:16])
    with MinerHarness(tmp_path, detector="baseline", extra=["--neuron.video_detector", "tall"]) as running:
        assert running.miner.video_detector.registry_name == "tall"
        responses = _query(running, running.validator_wallet, [clip, *_hostile_clips(), clip])
        assert [r.status for r in responses] == [200] * 7
        assert 0.0 <= responses[0].prediction <= 1.0
        # Same clip, same answer; batching it with other clips may reorder float sums, nothing more.
        assert responses[-1].prediction == pytest.approx(responses[0].prediction, abs=1e-6)
        assert [r.prediction for r in responses[1:-1]] == [-1.0] * 5
        # The image endpoint on the same axon is unaffected, and the blacklist guards both.
        assert _query(running, running.validator_wallet, [_image(0)], ImageSynapse)[0].prediction == 0.5
        assert _query(running, running.outsider_wallet, [clip])[0].status == 403


def test_video_detector_none_answers_minus_one(tmp_path):
    clip = encode_clip(moving_clip())
    with MinerHarness(tmp_path, detector="baseline", extra=["--neuron.video_detector", "none"]) as running:
        assert running.miner.video_detector is None and running.miner.video_batcher is None
        [response] = _query(running, running.validator_wallet, [clip])
        assert response.status == 200 and response.prediction == -1.0
        assert _query(running, running.validator_wallet, [_image(0)], ImageSynapse)[0].prediction == 0.5


def test_video_synapse_answers_like_image_synapse():
    synapse = VideoSynapse(video=encode_clip(moving_clip(seed=1)))
    assert synapse.deserialize() == NO_ANSWER == ImageSynapse().prediction
    assert VideoSynapse(video="bmv1:", prediction=[0.1, 0.6, 0.3]).deserialize() == pytest.approx(0.9)


def test_an_image_detector_as_video_detector_stops_start_up_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="is an image detector"):
        MinerHarness(tmp_path, detector="baseline", extra=["--neuron.video_detector", "baseline"])
