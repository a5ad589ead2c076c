"""Face gate and CAMO: routing by content, one expert call per batch, combination rules, bad configs."""

import logging
import math
import threading

import pytest
import yaml
from PIL import Image, ImageOps

from base_miner.detectors.camo import CAMO
from base_miner.gates import face as face_gate
from base_miner.gates.face import FaceGate
from base_miner.registry import ConfigError, build_detector
from tests._fixtures_camo import STAND_IN, camo_config, left_brightness, mean_brightness, pictures  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def gate() -> FaceGate:
    return FaceGate({})


# --- face gate -----------------------------------------------------------------------------------------------


def test_gate_aligns_the_astronaut_face_into_a_square_crop(gate, pictures):
    regions = gate.route(pictures["astronaut"])
    assert [content for content, _ in regions] == ["face"]
    crop = regions[0][1]
    assert crop.size == (256, 256) and crop.mode == "RGB"
    # The crop is the face itself: the detector finds a face filling most of it.
    again = gate.route(crop)
    assert len(again) == 1


@pytest.mark.parametrize("name", ["coffee", "chelsea"])
def test_gate_finds_no_face_in_pictures_without_people(gate, pictures, name):
    assert gate.route(pictures[name]) == []


def test_gate_config_reaches_detection_and_crop(pictures):
    small = pictures["astronaut"].resize((256, 256))  # face ~45 px: under HOG's 80 px window
    assert FaceGate({"upsample": 0}).route(small) == []
    assert len(FaceGate({"upsample": 1}).route(small)) == 1
    assert FaceGate({"min_face_size": 200}).route(pictures["astronaut"]) == []  # the face box is ~88 px
    assert FaceGate({"score_threshold": 5.0}).route(pictures["astronaut"]) == []
    [(_, crop)] = FaceGate({"crop_size": 128, "margin": 2.0}).route(pictures["astronaut"])
    assert crop.size == (128, 128)


def test_gate_shrinks_large_images_for_detection_only(pictures):
    large = pictures["astronaut"].resize((2048, 2048))
    [(_, crop)] = FaceGate({"detect_max_side": 512}).route(large)
    assert crop.size == (256, 256)
    assert FaceGate({}).route(Image.new("RGB", (8, 8))) == []


@pytest.mark.parametrize(
    "config",
    [{"upsample": 2}, {"margin": 0.5}, {"crop_size": "big"}, {"min_face_size": -1}, {"landmarks": "/nonexistent.dat"}],
)
def test_gate_rejects_bad_config(config):
    with pytest.raises(ConfigError):
        FaceGate(config)


def test_gate_rejects_a_file_that_is_not_a_predictor(tmp_path):
    bogus = tmp_path / "bogus.dat"
    bogus.write_bytes(b"not a shape predictor")
    with pytest.raises(ConfigError, match="not a dlib shape predictor"):
        FaceGate({"landmarks": str(bogus)})


def test_gate_gives_the_same_answers_from_several_threads_each_with_its_own_dlib_models(gate, pictures):
    """dlib's detector is not promised thread-safe and releases the GIL: each worker thread detects with its own."""
    images = [pictures["astronaut"], pictures["coffee"]] * 4
    [(_, expected_crop)] = gate.route(pictures["astronaut"])
    results: dict[int, list] = {}
    models: dict[int, int] = {}
    barrier = threading.Barrier(len(images))

    def work(index: int) -> None:
        barrier.wait(timeout=30)  # every thread alive at once, so their models cannot be recycled objects
        results[index] = [(content, crop.tobytes()) for content, crop in gate.route(images[index])]
        models[index] = id(face_gate._models(gate.landmarks)[0])
        barrier.wait(timeout=30)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [results[index] for index in range(len(images))] == [[("face", expected_crop.tobytes())], []] * 4
    assert len(set(models.values())) == len(images)


# --- CAMO ----------------------------------------------------------------------------------------------------


def test_camo_routes_faces_to_the_face_expert_and_takes_the_max(pictures):
    camo = build_detector(camo_config(face=0.9, general=0.2), device="cpu")
    assert isinstance(camo, CAMO)
    astronaut, coffee = camo.predict_detailed([pictures["astronaut"], pictures["coffee"]])
    assert (astronaut.route, astronaut.experts, astronaut.probability) == ("face", {"face": 0.9, "general": 0.2}, 0.9)
    assert (coffee.route, coffee.experts, coffee.probability) == ("general", {"general": 0.2}, 0.2)
    assert camo.predict([pictures["astronaut"], pictures["coffee"]]) == [0.9, 0.2]


def test_camo_weighted_mean_over_the_experts_that_ran(pictures):
    config = camo_config(face=0.9, general=0.2, combine="weighted_mean", weights={"face": 3, "general": 1})
    camo = build_detector(config, device="cpu")
    astronaut, coffee = camo.predict([pictures["astronaut"], pictures["coffee"]])
    assert astronaut == pytest.approx((3 * 0.9 + 1 * 0.2) / 4)
    assert coffee == pytest.approx(0.2)


def test_camo_general_on_faces_false_leaves_faces_to_the_face_expert(pictures):
    camo = build_detector(camo_config(face=0.1, general=0.7, general_on_faces=False), device="cpu")
    astronaut, coffee = camo.predict_detailed([pictures["astronaut"], pictures["coffee"]])
    assert (astronaut.experts, astronaut.probability) == ({"face": 0.1}, 0.1)
    assert (coffee.experts, coffee.probability) == ({"general": 0.7}, 0.7)


def _count_gate_calls(camo: CAMO) -> list:
    seen = []
    route = camo.gate.route
    camo.gate.route = lambda image: seen.append(image.size) or route(image)
    return seen


def test_camo_gate_margin_skips_the_gate_where_the_general_expert_is_confident(pictures):
    camo = build_detector(camo_config(face=0.1, general=0.95, gate_margin=0.3), device="cpu")
    gated = _count_gate_calls(camo)
    astronaut, coffee = camo.predict_detailed([pictures["astronaut"], pictures["coffee"]])
    # 0.95 is further than 0.3 from 0.5: the answer is final, the face is never looked for.
    assert gated == [] and camo.experts["face"].calls == []
    assert (astronaut.route, astronaut.experts, astronaut.probability) == ("general", {"general": 0.95}, 0.95)
    assert (coffee.route, coffee.probability) == ("general", 0.95)


def test_camo_gate_margin_sends_unsure_images_through_the_gate_in_one_expert_call(pictures):
    config = camo_config(face=0.1, general=0.6, gate_margin=0.3, combine="weighted_mean", weights={"face": 1, "general": 1})
    camo = build_detector(config, device="cpu")
    gated = _count_gate_calls(camo)
    batch = [pictures[name] for name in ("astronaut", "coffee", "astronaut")]
    predictions = camo.predict_detailed(batch)
    assert len(gated) == 3  # every image was unsure (0.6)
    assert camo.experts["general"].calls == [[image.size for image in batch]]  # first, every full image
    assert camo.experts["face"].calls == [[(256, 256), (256, 256)]]  # then both faces at once
    assert [p.route for p in predictions] == ["face", "general", "face"]
    assert predictions[0].experts == {"general": 0.6, "face": 0.1}
    assert predictions[0].probability == pytest.approx(0.35) and predictions[1].probability == pytest.approx(0.6)


def test_camo_gate_margin_decides_per_image_in_a_mixed_batch(pictures):
    """The general stand-in answers each image's mean brightness: only those within the margin of 0.5 are gated."""
    brightness = {name: mean_brightness(pictures[name]) for name in ("astronaut", "coffee", "chelsea")}
    margin = 0.5 * (abs(brightness["astronaut"] - 0.5) + abs(brightness["coffee"] - 0.5))
    assert abs(brightness["astronaut"] - 0.5) < margin < abs(brightness["coffee"] - 0.5)  # the pictures allow it
    camo = build_detector(camo_config(face=0.9, general="mean", gate_margin=margin), device="cpu")
    gated = _count_gate_calls(camo)
    predictions = camo.predict_detailed([pictures["coffee"], pictures["astronaut"]])
    assert gated == [pictures["astronaut"].size]
    assert [p.route for p in predictions] == ["general", "face"]
    assert predictions[1].probability == 0.9  # max of the face expert and the general one


def test_camo_mirror_margin_averages_the_logits_of_an_unsure_image_and_its_mirror(pictures):
    """The general stand-in reads the left half: the mirror image shows it the right half."""
    astronaut, coffee = pictures["astronaut"], pictures["coffee"]
    left = {name: left_brightness(pictures[name]) for name in ("astronaut", "coffee")}
    right = {name: left_brightness(ImageOps.mirror(pictures[name])) for name in ("astronaut", "coffee")}
    margin = 0.5 * (abs(left["astronaut"] - 0.5) + abs(left["coffee"] - 0.5))
    assert abs(left["astronaut"] - 0.5) < margin < abs(left["coffee"] - 0.5)  # the pictures allow it
    assert abs(left["astronaut"] - right["astronaut"]) > 0.01
    config = camo_config(face=0.5, general="left", gate_margin=margin, mirror_margin=margin, combine="weighted_mean",
                         weights={"face": 1, "general": 1})  # fmt: skip
    camo = build_detector(config, device="cpu")
    first, second = camo.predict_detailed([coffee, astronaut])
    assert camo.experts["general"].calls == [[coffee.size, astronaut.size], [astronaut.size]]  # only the unsure one
    assert first.experts == {"general": pytest.approx(left["coffee"])}  # a confident answer stays as it was

    def logit(p):
        return math.log(p / (1 - p))

    expected = 1 / (1 + math.exp(-(logit(left["astronaut"]) + logit(right["astronaut"])) / 2))
    assert second.route == "face" and second.experts["general"] == pytest.approx(expected)
    assert second.probability == pytest.approx((expected + 0.5) / 2)


def test_camo_mirror_margin_survives_an_expert_answering_exactly_0_or_1(pictures):
    camo = build_detector(camo_config(face=0.5, general=1.0, gate_margin=0.5, mirror_margin=0.5), device="cpu")
    answers = iter([[0.6], [1.0]])  # unsure at first, then certain on the mirror image
    camo.experts["general"].predict = lambda images: next(answers)
    [prediction] = camo.predict_detailed([pictures["coffee"]])
    assert 0.6 < prediction.experts["general"] < 1.0 and math.isfinite(prediction.probability)


def test_camo_mirror_margin_narrower_than_gate_margin_mirrors_only_the_closest_calls(pictures):
    brightness = {name: left_brightness(pictures[name]) for name in ("astronaut", "coffee")}
    near, far = sorted(brightness, key=lambda name: abs(brightness[name] - 0.5))
    between = 0.5 * (abs(brightness[near] - 0.5) + abs(brightness[far] - 0.5))
    camo = build_detector(camo_config(general="left", gate_margin=0.5, mirror_margin=between), device="cpu")
    gated = _count_gate_calls(camo)
    camo.predict_detailed([pictures["astronaut"], pictures["coffee"]])
    assert len(gated) == 2  # both within the gate's margin
    assert camo.experts["general"].calls[1] == [pictures[near].size] and len(camo.experts["general"].calls) == 2


def test_camo_calls_each_expert_once_per_batch_with_its_group(pictures):
    camo = build_detector(camo_config(), device="cpu")
    batch = [pictures[name] for name in ("astronaut", "coffee", "chelsea", "astronaut")]
    camo.predict(batch)
    assert camo.experts["face"].calls == [[(256, 256), (256, 256)]]  # the two aligned crops
    assert camo.experts["general"].calls == [[image.size for image in batch]]  # every full image


def test_camo_keeps_the_order_of_a_mixed_batch(pictures):
    camo = build_detector(camo_config(face=0.9, general="mean"), device="cpu")
    names = ["coffee", "astronaut", "chelsea", "astronaut", "coffee"]
    predictions = camo.predict_detailed([pictures[name] for name in names])
    assert [p.route for p in predictions] == ["general", "face", "general", "face", "general"]
    for name, prediction in zip(names, predictions):
        assert prediction.experts["general"] == pytest.approx(mean_brightness(pictures[name]))


def test_camo_sends_an_image_the_gate_fails_on_to_the_general_expert(pictures, caplog):
    camo = build_detector(camo_config(face=0.9, general=0.2), device="cpu")
    route = camo.gate.route

    def flaky_route(image):
        if image is pictures["chelsea"]:
            raise RuntimeError("dlib exploded")
        return route(image)

    camo.gate.route = flaky_route
    with caplog.at_level(logging.WARNING, logger="base_miner.detectors.camo"):
        predictions = camo.predict_detailed([pictures["astronaut"], pictures["chelsea"]])
    assert [(p.route, p.probability) for p in predictions] == [("face", 0.9), ("general", 0.2)]
    assert "image 1" in caplog.text and "dlib exploded" in caplog.text


def test_camo_treats_a_region_of_unknown_type_as_a_gate_failure(pictures):
    camo = build_detector(camo_config(face=0.9, general=0.2), device="cpu")
    camo.gate.route = lambda image: [("hands", image)]
    [prediction] = camo.predict_detailed([pictures["astronaut"]])
    assert (prediction.route, prediction.experts) == ("general", {"general": 0.2})


def test_camo_answers_an_empty_batch_without_calling_experts():
    camo = build_detector(camo_config(), device="cpu")
    assert camo.predict_detailed([]) == []
    assert camo.experts["face"].calls == [] and camo.experts["general"].calls == []


def test_camo_rejects_an_expert_with_the_wrong_number_of_outputs(pictures):
    camo = build_detector(camo_config(), device="cpu")
    camo.experts["general"].predict = lambda images: [0.5]
    with pytest.raises(RuntimeError, match="returned 1 probabilities for 2 images"):
        camo.predict([pictures["coffee"], pictures["chelsea"]])


def test_camo_reads_experts_from_yaml_paths_relative_to_its_config(tmp_path, pictures):
    (tmp_path / "face.yaml").write_text(yaml.safe_dump({"detector": STAND_IN, "value": 0.8}))
    (tmp_path / "general.yaml").write_text(yaml.safe_dump({"detector": STAND_IN, "value": 0.3}))
    config = {"detector": "CAMO", "gate": "face", "experts": {"face": "face.yaml", "general": "general.yaml"}}
    (tmp_path / "camo.yaml").write_text(yaml.safe_dump(config))
    camo = build_detector(str(tmp_path / "camo.yaml"), device="cpu")
    assert camo.predict([pictures["astronaut"], pictures["coffee"]]) == [0.8, 0.3]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"experts": {"hands": {"detector": STAND_IN, "value": 0.5}, "general": {"detector": STAND_IN, "value": 0.5}}},
         "never used"),
        ({"experts": {"face": {"detector": STAND_IN, "value": 0.5}}}, "'general' expert"),
        ({"experts": {"face": {"detector": "no-such-detector"}, "general": {"detector": STAND_IN, "value": 0.5}}},
         "unknown detector"),
        ({"experts": {"face": "no_such_config", "general": {"detector": STAND_IN, "value": 0.5}}},
         "no packaged detector config"),
        ({"experts": {"face": 3, "general": {"detector": STAND_IN, "value": 0.5}}}, "expert config must be"),
        ({"combine": "median"}, "unknown combine rule"),
        ({"combine": "weighted_mean"}, "needs weights"),
        ({"combine": "weighted_mean", "weights": {"face": 1}}, "needs weights"),
        ({"combine": "weighted_mean", "weights": {"face": 1, "general": -1}}, "positive number"),
        ({"general_on_faces": "yes"}, "general_on_faces"),
        ({"gate": "no-such-gate"}, "unknown gate"),
        ({"gate": {"name": "face", "upsample": 3}}, "upsample"),
        ({"gate_margin": 0}, "gate_margin must be"),
        ({"gate_margin": 0.6}, "gate_margin must be"),
        ({"gate_margin": True}, "gate_margin must be"),
        ({"gate_margin": "half"}, "gate_margin must be"),
        ({"gate_margin": 0.3, "general_on_faces": False}, "needs general_on_faces"),
        ({"mirror_margin": 0.1}, "needs gate_margin"),
        ({"gate_margin": 0.3, "mirror_margin": "yes"}, "mirror_margin must be"),
        ({"gate_margin": 0.3, "mirror_margin": 0.7}, "mirror_margin must be"),
        ({"gate_margin": 0.3, "experts": {"face": {"detector": STAND_IN, "value": 0.5},
                                          "general": {"detector": STAND_IN, "value": 0.5},
                                          "tiny": {"detector": STAND_IN, "value": 0.5}},
          "resolution_route": {"max_side": 64, "expert": "tiny", "max_effective_side": 36}}, "max_effective_side"),
    ],
)
def test_camo_rejects_bad_config_at_construction(change, message):
    with pytest.raises(ConfigError, match=message):
        build_detector({**camo_config(), **change}, device="cpu")


def test_packaged_camo_config_builds_the_real_experts_and_predicts(pictures):
    camo = build_detector("camo", device="cpu")
    assert {name: expert.name for name, expert in camo.experts.items()} == {
        "face": "face_probe",
        "general": "probe",
        "tiny": "tiny_cnn",
    }
    thumbnail = pictures["coffee"].resize((32, 32))
    gated = _count_gate_calls(camo)
    astronaut, coffee, thumb = camo.predict_detailed([pictures["astronaut"], pictures["coffee"], thumbnail])
    # The probe is unsure of the astronaut (within gate_margin of 0.5), so the gate looks for its face; the
    # thumbnail never reaches the gate.
    assert pictures["astronaut"].size in gated and thumbnail.size not in gated
    assert astronaut.route == "face" and set(astronaut.experts) == {"face", "general"}
    assert coffee.route == "general" and set(coffee.experts) == {"general"}
    assert thumb.route == "tiny" and set(thumb.experts) == {"tiny"}
    for prediction in (astronaut, coffee, thumb):
        assert 0.0 <= prediction.probability <= 1.0
    # A face's answer is the mean of the probe and the face expert: neither one's alarm decides alone.
    assert astronaut.probability == pytest.approx(sum(astronaut.experts.values()) / 2)
    assert thumb.probability == thumb.experts["tiny"]
