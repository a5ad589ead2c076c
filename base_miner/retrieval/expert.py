"""The retrieval expert: answers "real" for a challenge that is a distorted copy of an indexed public real image.

CAMO asks it first (`lookup`); a match answers the index's calibrated low probability with route `retrieval`, and
every other image goes to the usual experts. Two stages (`gather_evidence`): the CNN descriptor's match score picks
the best indexed image, and when the score reaches the shortlist, keypoints verify it (`local.py`). A look-up that
fails (it should not) costs only the look-up: the batch falls back to the experts, so serving never stops because of
the index.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from base_miner.retrieval.calibration import Calibration
from base_miner.retrieval.descriptor import Descriptor
from base_miner.retrieval.index import RetrievalIndex, RetrievalIndexError
from base_miner.retrieval.local import count_inliers, frame_size, query_features

__all__ = ["ROUTE", "Evidence", "Match", "RetrievalExpert", "gather_evidence"]

log = logging.getLogger(__name__)

ROUTE = "retrieval"


@dataclass(frozen=True)
class Match:
    probability: float  # P(AI-generated) to answer
    score: float  # CNN match score (>= the shortlist)
    inliers: int  # keypoints agreeing with the matched image (>= min_inliers)
    image: int  # number of the indexed image it matched


@dataclass(frozen=True)
class Evidence:
    scores: np.ndarray  # CNN match score per image
    best: np.ndarray  # the best indexed image per image
    inliers: np.ndarray  # keypoints agreeing with `best` (computed only where score >= shortlist, else 0)


def gather_evidence(descriptor: Descriptor, index: RetrievalIndex, images: list[Image.Image],
                    shortlist: float | Calibration) -> Evidence:  # fmt: skip
    """Both stages for a batch: one trunk pass per image, then keypoints (image and its mirror, each at two scales) for
    those whose score reaches the shortlist (one number, or the calibration's rule for their best indexed image)."""
    scores, best = index.scores(descriptor.embed(images))
    limits = shortlist.shortlists(best) if isinstance(shortlist, Calibration) else np.full(len(images), shortlist)
    inliers = np.zeros(len(images), dtype=np.int64)
    for n in np.flatnonzero(scores >= limits):
        reference, frames = index.reference(int(best[n])), (frame_size(images[n].size), index.frame(int(best[n])))
        inliers[n] = max(count_inliers(view, reference, frames) for view in query_features(images[n]))
    return Evidence(scores, best, inliers)


class RetrievalExpert:
    """A descriptor and an index with its calibration; `lookup` is the whole serving interface."""

    def __init__(self, descriptor: Descriptor, index: RetrievalIndex, calibration: Calibration, folder: str) -> None:
        self.descriptor = descriptor
        self.index = index
        self.calibration = calibration
        self.folder = folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "RetrievalExpert":
        """Load and verify an index; RetrievalIndexError (a ConfigError) says what is wrong with it."""
        descriptor = Descriptor(device=device)
        index, manifest = RetrievalIndex.load(folder, descriptor.identity())
        expert = cls(descriptor, index, Calibration.from_dict(manifest["calibration"]), str(folder))
        log.info(
            "retrieval index %s: %d images, %d entries (%s), match %s, answers p=%.4g, recall %s", folder,
            index.images, index.entries, index.settings["kind"], expert.calibration.describe(),
            expert.calibration.probability, {k: round(v, 3) for k, v in expert.calibration.recall.items()},
        )  # fmt: skip
        return expert

    @classmethod
    def from_config(cls, config: Any, device: str = "cpu") -> "RetrievalExpert | None":
        """From a detector config's `retrieval` value: absent/None means no look-up, `{index: DIR}` loads DIR."""
        if config is None:
            return None
        folder = config.get("index") if isinstance(config, dict) else None
        if not isinstance(folder, (str, Path)) or not str(folder) or set(config) != {"index"}:
            raise RetrievalIndexError(f"retrieval must be {{index: <folder built by bitmind-index>}}, got {config!r}")
        return cls.load(folder, device=device)

    def evidence(self, images: list[Image.Image]) -> Evidence:
        return gather_evidence(self.descriptor, self.index, images, self.calibration)

    def lookup(self, images: list[Image.Image]) -> list[Match | None]:
        """A Match for each image recognised as an indexed real image, None for the others."""
        if not images:
            return []
        try:
            found = self.evidence(images)
        except Exception as exc:  # noqa: BLE001 - the look-up is an optimisation; the experts still answer
            log.warning("retrieval look-up failed for %d images (%s: %s); the experts answer", len(images),
                        type(exc).__name__, exc)  # fmt: skip
            return [None] * len(images)
        calibration = self.calibration
        return [
            Match(calibration.probability, float(score), int(inliers), int(image))
            if calibration.matches(score, inliers, image) else None
            for score, inliers, image in zip(found.scores, found.inliers, found.best)
        ]  # fmt: skip
