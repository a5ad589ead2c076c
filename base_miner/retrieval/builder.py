"""Build a retrieval index from datasets: stream the rows, embed every view of each real image and keep its
keypoints, then fit the match rule.

Resumable: rows are read in fixed chunks; each chunk's vectors go to a shard file and then the build state records
the chunk as done (both written atomically), so a build killed at any moment and started again with the same
arguments redoes at most one chunk and ends with the same index as an uninterrupted build. The state lives in
`OUT/build/` and is removed once the manifest is written.

Rows: label 0 rows of `datasets` are indexed; their label 1 rows, and every row of `negatives`, are images that are
NOT in the index and serve as calibration negatives (up to `max_negatives`). Unreadable rows, and datasets whose
selection holds no rows, are counted and logged, never fatal; a dataset that cannot be loaded at all stops the build
before any work, and one that ends with no real image or too few negatives fails with a clear error.
"""

import io
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from base_miner.retrieval.calibration import Calibration, fit_calibration, fit_shortlists
from base_miner.retrieval.descriptor import Descriptor, index_views
from base_miner.retrieval.expert import gather_evidence
from base_miner.retrieval.index import MANIFEST, RetrievalIndex
from base_miner.retrieval.local import KEYPOINTS, LocalFeatures, frame_size, local_features
from base_miner.training.data import DataError, DatasetSpec, decode_row_image, load_spec
from bitmind.atomic import atomic_write_bytes
from bitmind.image_codec import ImageDecodeError

__all__ = ["BuildError", "BuildOptions", "Challenge", "build_index"]

log = logging.getLogger(__name__)

# What a validator makes of a real image at an augmentation level: (image, rng, level) -> challenge image.
Challenge = Callable[[Image.Image, np.random.Generator, int], Image.Image]
BUILD_STATE_VERSION = 1
WORK = "build"
STATE = "state.json"


class BuildError(DataError):
    """The build cannot start or finish: bad output folder, a different unfinished build, nothing to index."""


@dataclass(frozen=True)
class BuildOptions:
    chunk_rows: int = 256  # rows per shard: the most work an interruption can lose
    max_negatives: int = 5000  # calibration negatives kept (the first ones met, in dataset order)
    calibration_images: int = 250  # indexed images turned into challenges at every level to measure recall
    seed: int = 0  # of the calibration challenges


def _padded(keypoints: list[LocalFeatures], sizes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Keypoints of several images as fixed-size arrays (zero-padded to KEYPOINTS) plus the count of each and the
    size of the frame they were found in."""
    points = np.zeros((len(keypoints), KEYPOINTS, 2), np.float32)
    descriptors = np.zeros((len(keypoints), KEYPOINTS, 32), np.uint8)
    counts = np.zeros(len(keypoints), np.int32)
    for n, (found_points, found_descriptors) in enumerate(keypoints):
        counts[n] = len(found_points)
        points[n, : counts[n]], descriptors[n, : counts[n]] = found_points, found_descriptors
    frames = np.asarray(sizes, dtype=np.int32).reshape(len(keypoints), 2)
    return {"points": points, "descriptors": descriptors, "counts": counts, "sizes": frames}


def _shard_path(work: Path, number: int) -> Path:
    return work / f"shard-{number:06d}.npz"


class _Build:
    def __init__(self, datasets: Sequence[str], negatives: Sequence[str], out: Path, descriptor: Descriptor,
                 options: BuildOptions) -> None:  # fmt: skip
        self.sources = [(spec, "index") for spec in datasets] + [(spec, "negatives") for spec in negatives]
        self.out = out
        self.work = out / WORK
        self.descriptor = descriptor
        self.options = options
        self.loaded: dict[int, Any] = {}
        self.plan = {
            "version": BUILD_STATE_VERSION,
            "descriptor": descriptor.identity(),
            "sources": [list(source) for source in self.sources],
            "options": asdict(options),
        }
        self.state = self._load_state()

    def _load_state(self) -> dict[str, Any]:
        if (self.out / MANIFEST).exists():
            raise BuildError(f"{str(self.out)!r} already holds a complete index; choose another --out or delete it")
        path = self.work / STATE
        if not path.exists():
            if self.out.exists() and any(p.name != WORK for p in self.out.iterdir()):
                raise BuildError(f"{str(self.out)!r} is not empty and holds no index build; choose an empty or new folder")
            fresh = {"plan": self.plan, "source": 0, "row": 0, "shards": 0, "images": 0, "entries": 0,
                     "negatives": 0, "counts": [self._zero_counts(s) for s, _ in self.sources]}  # fmt: skip
            return fresh
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BuildError(f"unfinished build state {str(path)!r} is unreadable ({exc}); delete {str(self.work)!r}") from None
        if not isinstance(state, dict) or state.get("plan") != self.plan:
            raise BuildError(
                f"{str(self.out)!r} holds an unfinished build with other datasets, descriptor or options "
                f"({state.get('plan') if isinstance(state, dict) else state!r}); rerun it with those, or use another --out"
            )
        log.info("resuming the index build in %s at dataset %d row %d (%d images, %d negatives so far)",
                 self.out, state["source"] + 1, state["row"], state["images"], state["negatives"])  # fmt: skip
        return state

    @staticmethod
    def _zero_counts(spec: str) -> dict[str, Any]:
        return {"spec": spec, "rows": None, "indexed": 0, "negatives": 0, "unused": 0, "unreadable": 0}

    def _dataset(self, number: int):
        if number not in self.loaded:
            self.loaded[number] = load_spec(DatasetSpec.parse(self.sources[number][0]))
        return self.loaded[number]

    def _save_state(self) -> None:
        atomic_write_bytes(self.work / STATE, json.dumps(self.state, indent=1).encode())

    def run(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        for number in range(len(self.sources)):
            self._dataset(number)  # a dataset that cannot be loaded fails now, not hours into the build
        for number in range(self.state["source"], len(self.sources)):
            self._stream(number)
            self.state["source"], self.state["row"] = number + 1, 0
            self._save_state()

    def _stream(self, number: int) -> None:
        spec, role = self.sources[number]
        dataset = self._dataset(number)
        counts = self.state["counts"][number]
        counts["rows"] = len(dataset)
        if not len(dataset):
            log.warning("dataset %s has no rows; nothing to take from it", spec)
            return
        start, started, images_before = self.state["row"], time.perf_counter(), counts["indexed"]
        bar = tqdm(total=len(dataset), initial=start, desc=f"index {spec}", unit="row", leave=False)
        for begin in range(start, len(dataset), self.options.chunk_rows):
            end = min(begin + self.options.chunk_rows, len(dataset))
            self._chunk(number, role, dataset, begin, end, counts)
            bar.update(end - begin)
            bar.set_postfix(images_per_s=f"{(counts['indexed'] - images_before) / (time.perf_counter() - started):.1f}")
        bar.close()
        elapsed = time.perf_counter() - started
        log.info(
            "dataset %s: %d rows, %d real images indexed, %d negatives kept, %d rows unused, %d unreadable; "
            "%.1f images/s this run", spec, counts["rows"], counts["indexed"], counts["negatives"], counts["unused"],
            counts["unreadable"], (counts["indexed"] - images_before) / max(elapsed, 1e-9),
        )  # fmt: skip

    def _chunk(self, number: int, role: str, dataset, begin: int, end: int, counts: dict[str, Any]) -> None:
        rows = dataset[begin:end]
        views: list[Image.Image] = []
        owners: list[int] = []
        refs: list[tuple[int, int]] = []
        negatives: list[Image.Image] = []
        negative_refs: list[tuple[int, int]] = []
        keypoints: list[LocalFeatures] = []
        frames: list[tuple[int, int]] = []
        for offset, (cell, label) in enumerate(zip(rows["image"], rows["label"])):
            real_to_index = role == "index" and int(label) == 0
            negative_wanted = self.state["negatives"] + len(negatives) < self.options.max_negatives
            if not real_to_index and not negative_wanted:
                counts["unused"] += 1
                continue
            try:
                image = decode_row_image(cell)
            except ImageDecodeError as exc:
                counts["unreadable"] += 1
                log.warning("dataset %s row %d is unreadable (%s); skipped", self.sources[number][0], begin + offset, exc)
                continue
            if real_to_index:
                image_views = index_views(image)
                views.extend(image_views)
                owners.extend([self.state["images"] + len(refs)] * len(image_views))
                refs.append((number, begin + offset))
                keypoints.append(local_features(image))
                frames.append(frame_size(image.size))
            else:
                negatives.append(image)
                negative_refs.append((number, begin + offset))
        dim = self.descriptor.identity()["dim"]
        shard = {
            "vectors": self.descriptor.embed(views) if views else np.zeros((0, dim), np.float32),
            "owners": np.asarray(owners, dtype=np.int64),
            "refs": np.asarray(refs, dtype=np.int64).reshape(-1, 2),
            **_padded(keypoints, frames),
            "negatives": self.descriptor.embed(negatives) if negatives else np.zeros((0, dim), np.float32),
            "negative_refs": np.asarray(negative_refs, dtype=np.int64).reshape(-1, 2),
        }
        buffer = io.BytesIO()
        np.savez(buffer, **shard)
        atomic_write_bytes(_shard_path(self.work, self.state["shards"]), buffer.getvalue())
        self.state["shards"] += 1
        self.state["images"] += len(refs)
        self.state["entries"] += len(owners)
        self.state["negatives"] += len(negatives)
        counts["indexed"] += len(refs)
        counts["negatives"] += len(negatives)
        self.state["row"] = end
        self._save_state()

    def _shards(self) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {key: [] for key in
                                              ("vectors", "owners", "refs", "points", "descriptors", "counts",
                                               "sizes", "negatives", "negative_refs")}  # fmt: skip
        for number in range(self.state["shards"]):
            with np.load(_shard_path(self.work, number), allow_pickle=False) as shard:
                for key in parts:
                    parts[key].append(shard[key])
        return {key: np.concatenate(value) for key, value in parts.items()}

    def _image(self, ref: np.ndarray) -> Image.Image:
        source, row = (int(v) for v in ref)
        return decode_row_image(self._dataset(source)[row]["image"])

    def calibrate(self, index: RetrievalIndex, shards: dict[str, np.ndarray], challenge: Challenge,
                  levels: Sequence[int]) -> Calibration:  # fmt: skip
        """The match rule from the negatives and from challenges made of evenly spaced indexed images (each level),
        both run through the serving code (`gather_evidence`), with a rule per indexed dataset (`collections`)."""
        negative_scores, negative_best = (
            index.scores(shards["negatives"]) if len(shards["negatives"]) else (np.zeros(0), np.zeros(0, np.int64))
        )
        first, collections = 0, []
        for counts in self.state["counts"]:
            if counts["indexed"]:
                collections.append((first, counts["indexed"]))
                first += counts["indexed"]
        shortlists = fit_shortlists(negative_scores, negative_best, collections)
        lowest = min([shortlists.shortlist] + [rule["shortlist"] for rule in shortlists.collections])
        negative_inliers = np.zeros(len(negative_scores), dtype=np.int64)
        verified = np.flatnonzero(negative_scores >= lowest)
        for start in range(0, len(verified), self.descriptor.batch_size):
            rows = verified[start : start + self.descriptor.batch_size]
            images = [self._image(shards["negative_refs"][n]) for n in rows]
            negative_inliers[rows] = gather_evidence(self.descriptor, index, images, lowest).inliers
        refs = shards["refs"]
        chosen = np.unique(np.linspace(0, len(refs) - 1, min(self.options.calibration_images, len(refs))).round())
        chosen = chosen.astype(np.int64)
        queries: dict[int, list[Image.Image]] = {level: [] for level in levels}
        for image_number in tqdm(chosen, desc="calibration challenges", unit="img", leave=False):
            image = self._image(refs[image_number])
            for level in levels:
                rng = np.random.default_rng([self.options.seed, int(image_number), level])
                queries[level].append(challenge(image, rng, level))
        positives = {}
        for level, images in queries.items():
            found = gather_evidence(self.descriptor, index, images, lowest)
            positives[level] = (found.scores, np.where(found.best == chosen, found.inliers, 0), chosen)
        return fit_calibration(shortlists, positives, (negative_scores, negative_inliers, negative_best))

    def finish(self, challenge: Challenge, levels: Sequence[int]) -> dict[str, Any]:
        if not self.state["images"]:
            raise BuildError(f"no readable real (label 0) image in {[s for s, r in self.sources if r == 'index']}")
        shards = self._shards()
        started = time.perf_counter()
        local = {name: shards[name] for name in ("points", "descriptors", "counts", "sizes")}
        index = RetrievalIndex.create(shards["vectors"], shards["owners"], local)
        log.info("search index: %d entries of %d images, %s, built in %.1f s", index.entries, index.images,
                 index.settings["kind"], time.perf_counter() - started)  # fmt: skip
        calibration = self.calibrate(index, shards, challenge, levels)
        manifest = index.save(self.out, self.descriptor.identity(), self.state["counts"], calibration)
        shutil.rmtree(self.work)
        return manifest


def build_index(
    datasets: Sequence[str],
    out: str | Path,
    descriptor: Descriptor,
    challenge: Challenge,
    levels: Sequence[int],
    negatives: Sequence[str] = (),
    options: BuildOptions = BuildOptions(),
) -> dict[str, Any]:
    """Index the real images of `datasets` into `out` (resuming an unfinished build there); returns the manifest."""
    if not datasets:
        raise BuildError("give at least one dataset to index")
    for spec in [*datasets, *negatives]:
        DatasetSpec.parse(spec)  # a malformed spec fails before any work
    build = _Build(datasets, negatives, Path(out).expanduser(), descriptor, options)
    log.info("index build into %s: %d datasets to index, %d of negatives, %d rows per chunk, descriptor %s", out,
             len(datasets), len(negatives), options.chunk_rows, descriptor.identity()["name"])  # fmt: skip
    build.run()
    manifest = build.finish(challenge, levels)
    calibration = Calibration.from_dict(manifest["calibration"])
    log.info(
        "index %s: %d images, %d entries; match %s, answers p=%.4g; recall %s on %d challenges, %d negatives", out,
        manifest["images"], manifest["entries"], calibration.describe(), calibration.probability,
        {k: round(v, 3) for k, v in calibration.recall.items()}, calibration.positives, calibration.negatives,
    )  # fmt: skip
    return manifest
