"""Augmentation: reproducible per seed, every level gives 256² RGB, the geometry it reports is the geometry it did,
level probabilities are respected and validated."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from validator.augment import (
    CROP_SCALE,
    DEFAULT_LEVEL_PROBS,
    JPEG_QUALITY,
    LEVELS,
    MAX_ROTATION_DEG,
    Augmenter,
    parse_level_probs,
)


def photo(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8))


def gradient(size: int = 300) -> Image.Image:
    """Red encodes x, green encodes y: lets a test read back where output pixels came from."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    array = np.zeros((size, size, 3), np.float32)
    array[..., 0] = ramp[None, :]
    array[..., 1] = ramp[:, None]
    return Image.fromarray(array.astype(np.uint8))


def ops_by_name(info: dict) -> dict[str, dict]:
    return {op["op"]: op for op in info["ops"]}


@pytest.mark.parametrize("level", LEVELS)
def test_same_seed_same_output(level):
    augmenter = Augmenter()
    image = photo()
    first, info_a = augmenter(image, np.random.default_rng(42), level)
    second, info_b = augmenter(image, np.random.default_rng(42), level)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert info_a == info_b
    json.dumps(info_a)  # goes into challenge metadata


def test_different_seeds_give_different_outputs():
    augmenter = Augmenter()
    image = photo()
    outputs = {augmenter(image, np.random.default_rng(seed), 3)[0].tobytes() for seed in range(5)}
    assert len(outputs) == 5


def test_level_draw_is_reproducible_and_does_not_use_global_state():
    augmenter = Augmenter()
    np.random.seed(0)
    a = [augmenter(photo(), np.random.default_rng(s))[1] for s in range(10)]
    np.random.seed(1)
    b = [augmenter(photo(), np.random.default_rng(s))[1] for s in range(10)]
    assert a == b


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(
    "image",
    [
        photo(512, 384),
        photo(32, 32),
        photo(1500, 40),
        photo(2048, 2048),
        photo(300, 200).convert("L"),
        photo(300, 200).convert("RGBA"),
        photo(300, 200).convert("P"),
    ],
    ids=["512x384", "32x32", "1500x40", "2048x2048", "grey", "rgba", "palette"],
)
def test_every_level_gives_256_rgb(level, image):
    out, info = Augmenter()(image, np.random.default_rng(level), level)
    assert out.size == (256, 256) and out.mode == "RGB"
    assert info["level"] == level


def test_ops_per_level_and_their_ranges():
    augmenter = Augmenter()
    expected = {
        0: {"crop_resize"},
        1: {"rotate", "random_resized_crop"},
        2: {"rotate", "random_resized_crop", "saturation", "contrast", "jpeg"},
        3: {"rotate", "random_resized_crop", "saturation", "contrast", "jpeg", "gaussian_blur", "colour_noise"},
    }
    for level, names in expected.items():
        for seed in range(30):
            ops = ops_by_name(augmenter(photo(), np.random.default_rng(seed), level)[1])
            assert set(ops) - {"hflip", "vflip"} == names
            if level >= 1:
                assert abs(ops["rotate"]["degrees"]) <= MAX_ROTATION_DEG
                assert CROP_SCALE[0] <= ops["random_resized_crop"]["scale"] <= CROP_SCALE[1]
            if level >= 2:
                assert JPEG_QUALITY[0] <= ops["jpeg"]["quality"] <= JPEG_QUALITY[1]


def test_reported_flips_match_the_pixels():
    augmenter = Augmenter()
    flips = set()
    for seed in range(40):
        out, info = augmenter(gradient(), np.random.default_rng(seed), 1)
        ops = ops_by_name(info)
        array = np.asarray(out, dtype=np.float32)
        red_left_to_right = array[:, -20:, 0].mean() - array[:, :20, 0].mean()
        green_top_to_bottom = array[-20:, :, 1].mean() - array[:20, :, 1].mean()
        # ±20° rotation keeps the sign of each ramp; a flip reverses it.
        assert (red_left_to_right < 0) == ("hflip" in ops)
        assert (green_top_to_bottom < 0) == ("vflip" in ops)
        flips.add(("hflip" in ops, "vflip" in ops))
    assert len(flips) == 4


def test_reported_rotation_matches_the_pixels():
    """Estimate the angle of the gradient's x axis in the output and compare with the reported rotation."""
    augmenter = Augmenter()
    for seed in range(10):
        out, info = augmenter(gradient(), np.random.default_rng(seed), 1)
        ops = ops_by_name(info)
        red = np.asarray(out, dtype=np.float32)[..., 0]
        gy, gx = np.gradient(red)
        if "hflip" in ops:
            gx = -gx
        if "vflip" in ops:
            gy = -gy
        measured = math.degrees(math.atan2(gy.mean(), gx.mean()))
        # Content turned counter-clockwise on screen (PIL's convention, y down) makes the x ramp point up-right;
        # resizing a crop_w x crop_h crop to a square scales the slope by crop_h / crop_w.
        crop_w, crop_h = ops["random_resized_crop"]["crop_size"]
        theta = math.radians(ops["rotate"]["degrees"])
        expected = math.degrees(math.atan2(-crop_h * math.sin(theta), crop_w * math.cos(theta)))
        assert measured == pytest.approx(expected, abs=0.5)


def test_crop_stays_inside_the_rotated_image():
    """No fill colour (black corners) may enter the output: a white image stays white."""
    white = Image.new("RGB", (400, 300), (255, 255, 255))
    augmenter = Augmenter()
    for seed in range(60):
        out, _ = augmenter(white, np.random.default_rng(seed), 1)
        assert np.asarray(out).min() >= 250


def test_level_probabilities_are_respected():
    augmenter = Augmenter({0: 0.5, 2: 0.2, 3: 0.3})
    rng = np.random.default_rng(7)
    counts = np.bincount([augmenter.choose_level(rng) for _ in range(5000)], minlength=4)
    assert counts[1] == 0
    assert counts[0] == pytest.approx(2500, abs=200)
    assert counts[2] == pytest.approx(1000, abs=150)
    assert counts[3] == pytest.approx(1500, abs=180)


def test_weights_are_normalised_and_defaults_cover_all_levels():
    assert Augmenter({1: 2, 3: 6}).probs.tolist() == [0.25, 0.75]
    assert set(DEFAULT_LEVEL_PROBS) == set(LEVELS) and sum(DEFAULT_LEVEL_PROBS.values()) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    levels = {Augmenter()(photo(64, 64), rng)[1]["level"] for _ in range(200)}
    assert levels == set(LEVELS)


@pytest.mark.parametrize(
    "probs",
    [
        {0: -0.1, 1: 1.0},
        {0: 0.0, 1: 0.0},
        {4: 1.0},
        {-1: 1.0},
        {"1": 1.0},
        {True: 1.0},
        {1: float("nan")},
        {1: float("inf")},
        {1: "0.5"},
        {},
        [0.25, 0.25, 0.25, 0.25],
    ],
)
def test_invalid_level_probabilities_raise(probs):
    with pytest.raises(ValueError):
        Augmenter(probs)


def test_invalid_level_or_image_at_call_time():
    augmenter = Augmenter()
    with pytest.raises(ValueError):
        augmenter(photo(), np.random.default_rng(0), level=7)
    with pytest.raises(TypeError):
        augmenter(np.zeros((10, 10, 3)), np.random.default_rng(0))
    with pytest.raises(ValueError):
        Augmenter(size=0)


def test_parse_level_probs():
    assert parse_level_probs("0:0.1, 1:0.3,2:0.3,3:0.3") == {0: 0.1, 1: 0.3, 2: 0.3, 3: 0.3}
    assert Augmenter(parse_level_probs("3:1")).levels == (3,)
    for bad in ["", "0=0.5", "zero:1", "1:x", "1:0.5,1:0.5"]:
        with pytest.raises(ValueError):
            parse_level_probs(bad)
