"""CAMO's resolution route and stacked aggregation: thumbnails go to their native-size expert alone, a learned
aggregator decides instead of the loudest expert, round-trips through its file, and refuses files that do not fit."""

import json

import numpy as np
import pytest
from PIL import Image

from base_miner.arena.metrics import binary_metrics
from base_miner.detectors.aggregator import StackedAggregator
from base_miner.gates.resolution import effective_side
from base_miner.registry import ConfigError, build_detector
from base_miner.training.probe_fit import group_weights
from base_miner.training.stack_fit import fit_stack
from validator.augment import LEVELS, Augmenter
from tests._fixtures_camo import STAND_IN, camo_config, pictures  # noqa: F401 (fixture)

TINY = {"detector": STAND_IN, "value": 0.77}


def _stacked_config(tmp_path, aggregator: StackedAggregator, **keys):
    path = aggregator.save(tmp_path / "aggregator.json")
    return camo_config(combine="stacked", aggregator=str(path), **keys)


def test_thumbnails_go_to_the_resolution_expert_alone(pictures):
    config = camo_config(face=0.9, general=0.2, resolution_route={"max_side": 64, "expert": "tiny"})
    config["experts"]["tiny"] = TINY
    camo = build_detector(config, device="cpu")
    thumb, edge, big = Image.new("RGB", (32, 32)), Image.new("RGB", (64, 40)), pictures["coffee"]
    predictions = camo.predict_detailed([thumb, big, edge, pictures["astronaut"]])
    assert [p.route for p in predictions] == ["tiny", "general", "tiny", "face"]
    assert predictions[0].experts == {"tiny": 0.77} and predictions[0].probability == 0.77
    assert predictions[1].probability == 0.2 and "tiny" not in predictions[3].experts
    assert camo.experts["tiny"].calls == [[(32, 32), (64, 40)]]  # one call for both thumbnails
    assert camo.experts["general"].calls == [[big.size, pictures["astronaut"].size]]


def _upscaled_thumbnail(picture: Image.Image) -> Image.Image:
    """The validator's challenge made from a 32² thumbnail of `picture` (level 1: rotation, crop, flips, 256²)."""
    thumbnail = picture.resize((32, 32), Image.Resampling.BICUBIC)
    return Augmenter({1: 1.0})(thumbnail, np.random.default_rng(0))[0]


def test_effective_side_tells_up_scaled_thumbnails_from_photos(pictures):
    rng = np.random.default_rng(1)
    for level in LEVELS:
        challenge, _ = Augmenter({level: 1.0})(pictures["chelsea"].resize((32, 32), Image.Resampling.BICUBIC), rng)
        assert challenge.size == (256, 256) and effective_side(challenge) <= 36, level
    for name in ("coffee", "chelsea", "astronaut"):
        assert effective_side(pictures[name]) > 64, name  # a photo keeps detail up to its analysis size
        assert effective_side(Augmenter({0: 1.0})(pictures[name], rng)[0]) > 64, name
    assert effective_side(Image.new("RGB", (256, 256), (90, 90, 90))) == 0.0  # no detail at all
    assert effective_side(Image.new("RGB", (3, 2))) == 3.0  # too small to measure: its own side
    with pytest.raises(ValueError, match="energy"):
        effective_side(pictures["coffee"], energy=1.0)


def test_up_scaled_thumbnails_without_faces_go_to_the_resolution_expert(pictures):
    route = {"max_side": 64, "expert": "tiny", "max_effective_side": 36}
    config = camo_config(face=0.9, general=0.2, resolution_route=route)
    config["experts"]["tiny"] = TINY
    camo = build_detector(config, device="cpu")
    challenge = _upscaled_thumbnail(pictures["coffee"])
    predictions = camo.predict_detailed([challenge, pictures["coffee"], pictures["astronaut"]])
    assert [p.route for p in predictions] == ["tiny", "general", "face"]
    assert predictions[0].experts == {"tiny": 0.77} and predictions[0].probability == 0.77
    without = camo_config(face=0.9, general=0.2, resolution_route={"max_side": 64, "expert": "tiny"})
    without["experts"]["tiny"] = TINY
    assert build_detector(without, device="cpu").predict_detailed([challenge])[0].route == "general"


@pytest.mark.parametrize(
    "route, message",
    [({"max_side": 0, "expert": "tiny"}, "resolution_route"), ({"max_side": 64, "expert": "nope"}, "resolution_route"),
     ({"max_side": True, "expert": "tiny"}, "resolution_route"), ("64", "resolution_route"),
     ({"max_side": 64, "expert": "tiny", "max_effective_side": 0}, "resolution_route"),
     ({"max_side": 64, "expert": "tiny", "max_effective_side": "32"}, "resolution_route"),
     ({"max_side": 64, "expert": "tiny", "max_efective_side": 32}, "resolution_route")],
)
def test_bad_resolution_route_is_refused(route, message):
    config = camo_config()
    config["experts"]["tiny"] = TINY
    with pytest.raises(ConfigError, match=message):
        build_detector({**config, "resolution_route": route}, device="cpu")


def _outputs(rng, n, fake):
    """Expert outputs where `general` is informative and `face` (when it runs) raises a false alarm on real faces."""
    rows = []
    for _ in range(n):
        general = float(np.clip(rng.normal(0.75 if fake else 0.3, 0.12), 0.01, 0.99))
        row = {"general": general}
        if rng.random() < 0.5:
            row["face"] = float(np.clip(rng.normal(0.9, 0.05), 0.01, 0.99))  # alarms on every face, real or fake
        rows.append(row)
    return rows


def test_a_fitted_aggregator_outvotes_an_expert_that_alarms_on_everything(tmp_path, pictures):
    rng = np.random.default_rng(0)
    outputs = _outputs(rng, 200, False) + _outputs(rng, 200, True)
    labels = [0] * 200 + [1] * 200
    aggregator = StackedAggregator.fit(["general"], ["face"], outputs, labels)
    stacked = [aggregator.probability(o) for o in outputs]
    loudest = [max(o.values()) for o in outputs]
    assert binary_metrics(labels, stacked)["mcc"] > binary_metrics(labels, loudest)["mcc"] + 0.3
    # Calibration: the aggregator's probabilities have a far lower Brier score than the raw max.
    assert binary_metrics(labels, stacked)["brier"] < 0.7 * binary_metrics(labels, loudest)["brier"]
    # In CAMO: a real-looking face photo (general 0.2) with a face-expert alarm (0.9) is answered real.
    camo = build_detector(_stacked_config(tmp_path, aggregator, face=0.9, general=0.2), device="cpu")
    astronaut, coffee = camo.predict([pictures["astronaut"], pictures["coffee"]])
    assert astronaut < 0.5 and coffee < 0.5
    assert astronaut == pytest.approx(aggregator.probability({"general": 0.2, "face": 0.9}))


def test_aggregator_round_trips_through_its_file(tmp_path):
    rng = np.random.default_rng(1)
    outputs = _outputs(rng, 50, False) + _outputs(rng, 50, True)
    aggregator = StackedAggregator.fit(["general"], ["face"], outputs, [0] * 50 + [1] * 50, meta={"data": ["x"]})
    loaded = StackedAggregator.load(aggregator.save(tmp_path / "a.json"))
    assert loaded.to_dict() == aggregator.to_dict()
    for o in outputs[:10]:
        assert loaded.probability(o) == pytest.approx(aggregator.probability(o))


@pytest.mark.parametrize(
    "content, message",
    [("not json", "cannot read"), ('{"version": 99}', "version"), ('{"version": 1, "always": ["general"]}', "malformed"),
     ('{"version": 1, "always": ["general"], "optional": ["face"], "coef": {"logit:general": 1}, "intercept": 0}',
      "do not match"),
     ('{"version": 1, "always": ["general"], "optional": [], "coef": {"logit:general": NaN}, "intercept": 0}',
      "non-finite")],
)
def test_bad_aggregator_files_are_refused_at_start(tmp_path, content, message):
    path = tmp_path / "aggregator.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        build_detector(camo_config(combine="stacked", aggregator=str(path)), device="cpu")


def test_aggregator_fitted_for_other_experts_is_refused(tmp_path):
    other = StackedAggregator(["general", "npr"], ["face"], {"logit:general": 1.0, "logit:npr": 1.0,
                                                             "logit:face": 1.0, "ran:face": 0.0}, 0.0)  # fmt: skip
    with pytest.raises(ConfigError, match="fitted for"):
        build_detector(_stacked_config(tmp_path, other), device="cpu")
    with pytest.raises(ConfigError, match="needs aggregator"):
        build_detector(camo_config(combine="stacked"), device="cpu")


def test_stack_fit_reports_sources_it_left_out():
    """Leave-one-source-out: each source is predicted by an aggregator that never saw it."""
    camo = build_detector(camo_config(), device="cpu")
    rng = np.random.default_rng(2)
    outputs = _outputs(rng, 60, False) + _outputs(rng, 60, True)
    labels = [0] * 60 + [1] * 60
    sources = ["real-a"] * 30 + ["real-b"] * 30 + ["fake-a"] * 30 + ["fake-b"] * 30
    final, held_out = fit_stack(camo, outputs, labels, sources, 1.0, {"data": []})
    assert np.isfinite(held_out).all() and binary_metrics(labels, held_out)["mcc"] > 0.5
    first = StackedAggregator.fit(["general"], ["face"], outputs[30:], labels[30:],
                                  group_weights(np.asarray(labels[30:]), np.asarray(sources[30:])))
    assert held_out[0] == pytest.approx(first.probability(outputs[0]), rel=1e-6)
    assert final.meta == {"data": []} and json.dumps(final.to_dict())


class _Index:
    """A look-up that recognises images by their top-left pixel (red = indexed), like RetrievalExpert.lookup."""

    def __init__(self, config, device="cpu"):
        self.config = config

    def lookup(self, images):
        from base_miner.retrieval.expert import Match

        return [Match(0.01, 0.99, 40, 7) if image.getpixel((0, 0))[0] > 200 else None for image in images]


def test_images_the_retrieval_index_recognises_skip_the_experts(pictures, monkeypatch):
    from base_miner.retrieval import expert

    monkeypatch.setattr(expert.RetrievalExpert, "from_config", classmethod(lambda cls, config, device="cpu": _Index(config)))
    config = camo_config(face=0.9, general=0.6, retrieval={"index": "/some/index"})
    camo = build_detector(config, device="cpu")
    known = Image.new("RGB", (256, 256), (255, 0, 0))
    predictions = camo.predict_detailed([known, pictures["coffee"], known])
    assert [p.route for p in predictions] == ["retrieval", "general", "retrieval"]
    assert predictions[0].probability == 0.01 and predictions[0].experts == {"retrieval": 0.01}
    assert predictions[1].probability == 0.6
    assert camo.experts["general"].calls == [[pictures["coffee"].size]]  # matched images never reach an expert


def test_without_an_index_camo_looks_nothing_up_and_a_bad_index_stops_start_up(pictures, tmp_path):
    camo = build_detector(camo_config(general=0.6), device="cpu")
    assert camo.retrieval is None and camo.predict([Image.new("RGB", (256, 256), (255, 0, 0))]) == [0.6]
    with pytest.raises(ConfigError):
        build_detector(camo_config(retrieval={"index": str(tmp_path / "missing")}), device="cpu")


def test_weighted_mean_weighs_only_the_experts_it_combines():
    config = camo_config(combine="weighted_mean", weights={"face": 1, "general": 1},
                         resolution_route={"max_side": 64, "expert": "tiny"})  # fmt: skip
    config["experts"]["tiny"] = TINY
    assert build_detector(config, device="cpu").weights == {"face": 1.0, "general": 1.0}
    with pytest.raises(ConfigError, match="needs weights"):  # the thumbnail expert answers alone: no weight for it
        build_detector({**config, "weights": {"face": 1, "general": 1, "tiny": 1}}, device="cpu")
