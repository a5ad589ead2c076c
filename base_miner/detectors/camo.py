"""CAMO, the content-aware mixture of experts: a gate routes each image by content to expert detectors.

For a batch, images are routed, the routed images are grouped per expert, each expert's `predict` runs once on its
group, and each image's expert outputs are combined into one probability. Routing:
0. Retrieval (with `retrieval: {index: DIR}`, the miner's `--miner.index`): an image recognised as a distorted copy
   of an indexed public real image is answered by the index's calibrated low probability, route `retrieval`.
1. Resolution: an image whose longer side is at most `resolution_route.max_side` (a 32² thumbnail) goes to that
   route's expert alone — a net trained at that native size; up-scaling it for the others would erase the evidence.
   With `max_effective_side`, so does an up-scaled thumbnail (a validator's 256² challenge made from one): an image
   in which the gate finds no face and whose detail fits a grid that small (`gates/resolution.py`).
2. Content: the gate looks at every other image; a face goes to the face expert (aligned crop).
3. The `always` experts (default: `general`) see every other full image (with `general_on_faces: false`, only
   images without a gate region).
With `gate_margin: m` the order of 2 and 3 turns into a cascade: the `always` experts answer first, and only an
image they answer within m of 0.5 goes through the gate to the content experts. A confident answer is final, so the
gate and the face expert, about half of CAMO's CPU time, are spent only where a second opinion can matter. With
`mirror_margin: n` an image they answer within n of 0.5 is also shown, mirrored, to the `always` experts, and each
one's answer becomes the mean of its two logits: test-time mirroring where it can change a decision, not everywhere.
Combining: `stacked` (a logistic regression over expert logits fitted on images no expert trained on, see
`aggregator.py`), `weighted_mean`, or `max` (the reference subnet's rule, which lets one false alarm decide).
Maps: an expert that produces generated-pixel maps (a segmenter among the `always` experts) lends its map of the
full image to CAMO's answer (`Prediction.mask`), so a miner can return it.
"""

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from base_miner.detectors.aggregator import StackedAggregator, clipped_logit
from base_miner.detectors.base import DeepfakeDetector, Prediction
from base_miner.gates.resolution import effective_side
from base_miner.registry import ConfigError, build_detector, build_gate, register_detector

__all__ = ["CAMO", "COMBINE_RULES", "GENERAL"]

log = logging.getLogger(__name__)

GENERAL = "general"
RETRIEVAL = "retrieval"  # the route of an image answered by the retrieval index
COMBINE_RULES = ("max", "weighted_mean", "stacked")
_KNOWN_KEYS = {
    "detector", "name", "description", "device", "config_dir", "gate", "experts", "combine", "weights",
    "general_on_faces", "always", "resolution_route", "aggregator", "retrieval", "gate_margin", "mirror_margin",
}  # fmt: skip


def _resolve_expert(spec: Any, config_dir: str | None) -> str | dict[str, Any]:
    """An expert's config as `build_detector` takes it; relative YAML paths are relative to the CAMO config."""
    if isinstance(spec, dict):
        spec = dict(spec)
        if config_dir:
            spec.setdefault("config_dir", config_dir)
        return spec
    if isinstance(spec, (str, Path)) and str(spec):
        path = Path(spec)
        if config_dir and path.suffix and not path.is_absolute() and (Path(config_dir) / path).is_file():
            return str(Path(config_dir) / path)
        return str(spec)
    raise ConfigError(f"CAMO expert config must be a config name, a YAML path or a mapping, got {spec!r}")


def _check_margin(key: str, margin: Any) -> float | None:
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin <= 0.5:
        raise ConfigError(f"CAMO: {key} must be a number in (0, 0.5] or null, got {margin!r}")
    return float(margin)


def _mean_logit(first: float, second: float) -> float:
    """The probability whose logit is the mean of the two answers' logits (answers of 0 or 1 are clipped first)."""
    mean = 0.5 * (clipped_logit(first, 1e-7) + clipped_logit(second, 1e-7))
    return 1.0 / (1.0 + math.exp(-mean))


@register_detector("CAMO")
class CAMO(DeepfakeDetector):
    """Content-aware mixture of experts.

    Config keys:
      gate              gate name or mapping `{name: face, ...gate keys}` (default `face`)
      experts           `{general: <config>, <name>: <config>, ...}`; a config is a packaged config name, a YAML
                        path (relative to this file) or an inline mapping; `general` is required, every other
                        key is a content type the gate emits, an `always` expert or the resolution route's expert
      always            experts that see every full image (default `[general]`), e.g. `[general, npr]`
      resolution_route  `{max_side: N, expert: NAME[, max_effective_side: M]}`: images with longer side ≤ N go to
                        NAME alone, and so do faceless images whose effective resolution is ≤ M pixels across
      combine           `stacked`, `weighted_mean` or `max` (default `max`)
      aggregator        with `stacked`: the aggregator JSON written by bitmind-fit-stack (relative to this file)
      weights           `{expert: weight > 0}` for every expert but the resolution route's; required by `weighted_mean`
      general_on_faces  also run the `always` experts on the full image when the gate found a region (default true)
      gate_margin       m in (0, 0.5]: the gate sees only images the `always` experts answer within m of 0.5 (they
                        answer first; needs general_on_faces true and no max_effective_side); null: every image
      mirror_margin     n in (0, 0.5], with gate_margin: the always experts also read the mirror image of an image they
                        answered within n of 0.5, and each one's answer is the mean of the two logits; null: never
    """

    def __init__(self, config: dict[str, Any], device: str | None = None) -> None:
        super().__init__(config, device)
        unknown = sorted(set(self.config) - _KNOWN_KEYS)
        if unknown:
            log.warning("CAMO config: ignoring unknown keys %s", unknown)
        self.gate = build_gate(self.config.get("gate") or "face")
        self.combine = self.config.get("combine", "max")
        if self.combine not in COMBINE_RULES:
            raise ConfigError(f"CAMO: unknown combine rule {self.combine!r}; choose from {list(COMBINE_RULES)}")
        self.general_on_faces = self.config.get("general_on_faces", True)
        if not isinstance(self.general_on_faces, bool):
            raise ConfigError(f"CAMO: general_on_faces must be true or false, got {self.general_on_faces!r}")
        specs = self.config.get("experts")
        if not isinstance(specs, dict) or GENERAL not in specs:
            raise ConfigError(f"CAMO: experts must be a mapping with a {GENERAL!r} expert, got {specs!r}")
        self.always = self._check_always(self.config.get("always", [GENERAL]), specs)
        self.tiny_side, self.tiny_expert, self.tiny_effective_side = self._check_resolution_route(
            self.config.get("resolution_route"), specs
        )
        self.content_experts = [n for n in specs if n in getattr(self.gate, "content_types", ())]
        allowed = {*self.always, *self.content_experts, *([self.tiny_expert] if self.tiny_expert else [])}
        for name in specs:
            if name not in allowed:
                raise ConfigError(
                    f"CAMO: expert {name!r} is never used; it must be a content type the gate emits "
                    f"{sorted(getattr(self.gate, 'content_types', ()))}, listed in always, or the resolution route's"
                )
        self.gate_margin = self._check_gate_margin(self.config.get("gate_margin"))
        self.mirror_margin = _check_margin("mirror_margin", self.config.get("mirror_margin"))
        if self.mirror_margin is not None and self.gate_margin is None:
            raise ConfigError("CAMO: mirror_margin needs gate_margin (the always experts must answer first)")
        combined = [name for name in specs if name != self.tiny_expert]  # the thumbnail expert answers alone
        self.weights = self._check_weights(self.config.get("weights"), combined)
        config_dir = self.config.get("config_dir")
        self.aggregator = self._load_aggregator(config_dir)
        self.experts: dict[str, DeepfakeDetector] = {
            name: build_detector(_resolve_expert(spec, config_dir), device=self.device) for name, spec in specs.items()
        }
        self.produces_masks = any(expert.produces_masks for expert in self.experts.values())
        self.retrieval = None
        if self.config.get("retrieval") is not None:
            from base_miner.retrieval.expert import RetrievalExpert  # faiss and the index only when configured

            self.retrieval = RetrievalExpert.from_config(self.config["retrieval"], device=self.device)
        log.info(
            "CAMO ready: gate %s, experts %s, always %s, thumbnails (≤ %s px, effective ≤ %s px) → %s, combine %s, "
            "general_on_faces %s, gate_margin %s, mirror_margin %s",
            type(self.gate).__name__,
            {name: expert.name for name, expert in self.experts.items()},
            self.always,
            self.tiny_side,
            self.tiny_effective_side,
            self.tiny_expert,
            self.combine,
            self.general_on_faces,
            self.gate_margin,
            self.mirror_margin,
        )

    @staticmethod
    def _check_always(always: Any, experts: dict[str, Any]) -> list[str]:
        if not isinstance(always, list) or GENERAL not in always or not set(always) <= set(experts):
            raise ConfigError(f"CAMO: always must be a list of configured experts including {GENERAL!r}, got {always!r}")
        return list(dict.fromkeys(always))

    @staticmethod
    def _check_resolution_route(route: Any, experts: dict[str, Any]) -> tuple[int | None, str | None, int | None]:
        if route is None:
            return None, None, None
        shape = "{max_side: int >= 1, expert: <configured expert>[, max_effective_side: int >= 1]}"
        if not isinstance(route, dict) or set(route) - {"max_side", "expert", "max_effective_side"}:
            raise ConfigError(f"CAMO: resolution_route must be {shape}, got {route!r}")
        side, expert, effective = route.get("max_side"), route.get("expert"), route.get("max_effective_side")
        for value in (side, effective) if effective is not None else (side,):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CAMO: resolution_route must be {shape}, got {route!r}")
        if expert not in experts:
            raise ConfigError(f"CAMO: resolution_route must be {shape}, got {route!r}")
        return side, expert, effective

    def _check_gate_margin(self, margin: Any) -> float | None:
        margin = _check_margin("gate_margin", margin)
        if margin is None:
            return None
        if not self.general_on_faces:
            raise ConfigError("CAMO: gate_margin needs general_on_faces: true (the always experts answer first)")
        if self.tiny_effective_side:
            raise ConfigError("CAMO: gate_margin cannot combine with max_effective_side, whose route needs the gate first")
        return margin

    def _load_aggregator(self, config_dir: str | None) -> StackedAggregator | None:
        if self.combine != "stacked":
            return None
        path = self.config.get("aggregator")
        if not isinstance(path, str) or not path:
            raise ConfigError("CAMO: combine stacked needs aggregator: <file written by bitmind-fit-stack>")
        full = Path(config_dir) / path if config_dir and not Path(path).is_absolute() else Path(path)
        aggregator = StackedAggregator.load(full)
        optional = set(self.content_experts)
        if aggregator.always != self.always or set(aggregator.optional) != optional:
            raise ConfigError(
                f"CAMO: aggregator {str(full)!r} was fitted for always {aggregator.always} and optional "
                f"{aggregator.optional}, but this config has always {self.always} and optional {sorted(optional)}"
            )
        return aggregator

    def _check_weights(self, weights: Any, experts: list[str]) -> dict[str, float]:
        if self.combine != "weighted_mean":
            return {}
        if not isinstance(weights, dict) or set(weights) != set(experts):
            raise ConfigError(f"CAMO: weighted_mean needs weights for exactly the experts {sorted(experts)}")
        for name, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
                raise ConfigError(f"CAMO: weight of expert {name!r} must be a positive number, got {weight!r}")
        return {name: float(weight) for name, weight in weights.items()}

    def _route(self, index: int, image: Image.Image) -> list[tuple[str, Image.Image]]:
        """The gate's regions for one image; a failing or misbehaving gate means no region (general expert)."""
        try:
            regions = list(self.gate.route(image))
            for content, region in regions:
                if content not in self.experts or not isinstance(region, Image.Image):
                    raise ValueError(f"gate returned a region of unknown type {content!r} or not an image")
            return regions
        except Exception as exc:  # noqa: BLE001 - any gate failure must only cost this image its face expert
            log.warning("CAMO gate failed on image %d (%s: %s); using the general expert", index, type(exc).__name__, exc)
            return []

    def _run_expert(self, name: str, images: list[Image.Image]) -> tuple[list[float], list[np.ndarray | None]]:
        """Probabilities (checked, clipped) and, from an expert that produces them, generated-pixel maps."""
        expert = self.experts[name]
        if expert.produces_masks:
            detailed = list(expert.predict_detailed(images))
            outputs, maps = [p.probability for p in detailed], [p.mask for p in detailed]
        else:
            outputs = list(expert.predict(images))
            maps = [None] * len(outputs)
        if len(outputs) != len(images):
            raise RuntimeError(f"CAMO expert {name!r} returned {len(outputs)} probabilities for {len(images)} images")
        probabilities = []
        for value in outputs:
            value = float(value)
            if not math.isfinite(value):
                raise RuntimeError(f"CAMO expert {name!r} returned a non-finite probability {value!r}")
            probabilities.append(min(1.0, max(0.0, value)))
        return probabilities, maps

    def _combine(self, outputs: dict[str, float]) -> float:
        if self.aggregator is not None:
            return self.aggregator.probability(outputs)
        if self.combine == "max":
            return max(outputs.values())
        total = sum(self.weights[name] for name in outputs)
        return sum(self.weights[name] * value for name, value in outputs.items()) / total

    @staticmethod
    def _enqueue_regions(index: int, regions: list[tuple[str, Image.Image]], routes: list[str],
                         queues: dict[str, list[tuple[int, Image.Image]]]) -> None:  # fmt: skip
        """Image `index` takes the route of its first region; each region joins its content expert's queue."""
        routes[index] = regions[0][0] if regions else GENERAL
        for content, region in regions:
            queues[content].append((index, region))

    def _run_queues(
        self, queues: dict[str, list[tuple[int, Image.Image]]], images: list[Image.Image],
        outputs: list[dict[str, float]], masks: list[np.ndarray | None],
    ) -> None:  # fmt: skip
        """Each expert once on its queue; its answers (and full-image maps) land in `outputs` / `masks`."""
        for name, queue in queues.items():
            if not queue:
                continue
            probabilities, maps = self._run_expert(name, [region for _, region in queue])
            for (index, region), probability, prob_map in zip(queue, probabilities, maps):
                # Several regions of one type (a gate reporting every face) keep the most suspicious one.
                outputs[index][name] = max(probability, outputs[index].get(name, 0.0))
                if prob_map is not None and region is images[index]:  # a map of a crop is not the image's map
                    masks[index] = prob_map

    def _mirror_views(self, indices: list[int], images: list[Image.Image], outputs: list[dict[str, float]]) -> None:
        """Each `always` expert also reads the mirror image of `indices`; its answer becomes the mean of both logits."""
        mirrored = [ImageOps.mirror(images[index]) for index in indices]
        for name in self.always:
            probabilities, _ = self._run_expert(name, mirrored)  # a map of the mirror image is not the image's map
            for index, probability in zip(indices, probabilities):
                outputs[index][name] = _mean_logit(outputs[index][name], probability)

    def warm_up(self, images: list[Image.Image]) -> None:
        """Every expert on the images, whatever the route would pick: warm-up images show no face, so the face
        expert's ONNX export (about 6 s on a CPU core) was left to the first gated face a validator sent. Then the
        gate on each image, then the whole mixture."""
        for expert in self.experts.values():
            expert.warm_up(images)
        for index, image in enumerate(images):
            self._route(index, image)
        self.predict(images)

    def predict_detailed(self, images: list[Image.Image]) -> list[Prediction]:
        """Route every image, run each expert once on its group, combine per image (order kept)."""
        routes: list[str] = [GENERAL] * len(images)
        queues: dict[str, list[tuple[int, Image.Image]]] = {name: [] for name in self.experts}
        deferred: list[int] = []  # with gate_margin: images whose gate waits for the always experts' answer
        matches = self.retrieval.lookup(images) if self.retrieval is not None else [None] * len(images)
        for index, (image, match) in enumerate(zip(images, matches)):
            if match is not None:
                routes[index] = RETRIEVAL
                continue
            if self.tiny_expert and max(image.size) <= self.tiny_side:
                routes[index] = self.tiny_expert
                queues[self.tiny_expert].append((index, image))
                continue
            if self.gate_margin is not None:
                deferred.append(index)
                regions = []
            else:
                regions = self._route(index, image)
                if not regions and self.tiny_effective_side and effective_side(image) <= self.tiny_effective_side:
                    routes[index] = self.tiny_expert
                    queues[self.tiny_expert].append((index, image))
                    continue
                self._enqueue_regions(index, regions, routes, queues)
            if not regions or self.general_on_faces:
                for name in self.always:
                    queues[name].append((index, image))
        outputs: list[dict[str, float]] = [{} for _ in images]
        masks: list[np.ndarray | None] = [None] * len(images)
        self._run_queues(queues, images, outputs, masks)
        if deferred:
            doubt = {index: abs(self._combine(outputs[index]) - 0.5) for index in deferred}
            mirror = [index for index in deferred if self.mirror_margin is not None and doubt[index] < self.mirror_margin]
            if mirror:
                self._mirror_views(mirror, images, outputs)
            unsure = [index for index in deferred if doubt[index] < self.gate_margin]
            queues = {name: [] for name in self.experts}
            for index in unsure:
                self._enqueue_regions(index, self._route(index, images[index]), routes, queues)
            self._run_queues(queues, images, outputs, masks)
        predictions = []
        for route, experts, match, mask in zip(routes, outputs, matches, masks):
            if match is not None:
                predictions.append(Prediction(match.probability, route=RETRIEVAL, experts={RETRIEVAL: match.probability}))
            else:
                probability = experts[route] if route == self.tiny_expert else self._combine(experts)
                predictions.append(Prediction(probability, route=route, experts=experts, mask=mask))
        return predictions
