"""`bitmind-fit-probe`: fit a probe detector's linear head on frozen features, choosing L2 strength by leaving
whole sources out.

    bitmind-fit-probe --detector probe --train ../shared/data/diverse --copies 1 --out runs/probe

Why a closed fit and not SGD: the backbone is frozen, so one pass extracts every image's features (cached on disk,
resumable: an interrupted extraction continues where it stopped) and the head is an L2-regularised logistic
regression — a convex problem solved exactly in seconds. Every (label, source) group gets the same total weight
within its class and the classes weigh the same, so 800 portraits from one generator cannot teach "portrait means
fake". `--content-clusters` goes further where topics differ between the classes: within clusters of image content
the real and generated weights move toward the same total, so a topic seen mostly among generated images (churches,
city scenes) cannot make real photos of it "generated" (docs/TRAINING.md, "The content-balanced probe"). The
regularisation strength is chosen by cross-validation over whole sources (GroupKFold), i.e. by how well the head does
on sources it has not seen — the question the subnet asks.
`--streaming --max-rows N` samples a hub dataset too large to download whole: N rows of its stream, shuffled
through a buffer, are written once as a local parquet file beside the feature cache and fitted like any local data.
"""

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import GroupKFold
from tqdm.auto import tqdm

from base_miner.detectors.probe import ProbeDetector
from base_miner.registry import ConfigError, build_detector, build_gate, load_config
from base_miner.training.augment import OPERATIONS, TrainAugment, parse_operations
from base_miner.training.cli import parse_overrides, run_command
from base_miner.training.data import (
    DataError,
    DatasetSpec,
    Selector,
    data_fingerprint,
    decode_row_image,
    face_crops,
    load_spec,
    parse_selector,
    select,
    stratified_subset,
)
from base_miner.training.streaming import open_stream, select_stream
from bitmind.arg_types import positive
from bitmind.atomic import atomic_write_bytes, atomic_writer
from bitmind.image_codec import ImageDecodeError, to_rgb
from bitmind.stream_shuffle import shuffle_stream

__all__ = ["build_parser", "content_weights", "extract_features", "fit_head", "group_weights", "main", "stream_sample"]

log = logging.getLogger("bitmind-fit-probe")

DEFAULT_CS = (0.0001, 0.0003, 0.001, 0.003)


def group_weights(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Sample weights (mean 1): each class weighs the same, and within a class every group weighs the same."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    weights = np.zeros(len(labels), dtype=np.float64)
    classes = np.unique(labels)
    for label in classes:
        in_class = labels == label
        names = np.unique(groups[in_class])
        for name in names:
            member = in_class & (groups == name)
            weights[member] = 1.0 / (len(classes) * len(names) * member.sum())
    return weights * (len(labels) / weights.sum()) if len(labels) else weights


def content_weights(
    weights: np.ndarray, labels: np.ndarray, clusters: np.ndarray, strength: float
) -> np.ndarray:
    """`weights` rescaled so that within every content cluster real and generated images move toward the same total
    weight: each class's share is multiplied by (smaller class total / its total) ** `strength`. At strength 1 a
    topic predicts nothing; at any strength above 0 a cluster holding one class only gets no weight (the limit of
    that rule as the other class vanishes). Mean 1, like `group_weights`."""
    weights = np.asarray(weights, dtype=np.float64).copy()
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    for cluster in np.unique(clusters):
        members = [(clusters == cluster) & (labels == label) for label in (0, 1)]
        totals = [weights[m].sum() for m in members]
        target = min(totals)
        for member, total in zip(members, totals):
            if total > 0:
                weights[member] *= (target / total) ** strength
    if not weights.sum():
        raise DataError("no content cluster holds both real and generated images; lower --content-clusters")
    return weights * (len(weights) / weights.sum())


def fit_head(
    features: np.ndarray, labels: np.ndarray, weights: np.ndarray, c: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Standardise, then L2 logistic regression; returns (mean, scale, weight, bias) over standardised features."""
    mean = features.mean(0)
    scale = features.std(0)
    scale[scale < 1e-6] = 1.0
    model = LogisticRegression(C=c, max_iter=2000)
    model.fit((features - mean) / scale, labels, sample_weight=weights)
    return mean, scale, model.coef_.reshape(-1), float(model.intercept_[0])


def _cv_loss(features, labels, weights, groups, c: float, folds: int) -> float:
    """Weighted log-loss of out-of-fold predictions, folds made of whole groups."""
    predictions = np.zeros(len(labels))
    for train, test in GroupKFold(n_splits=folds).split(features, labels, groups):
        mean, scale, weight, bias = fit_head(features[train], labels[train], weights[train], c)
        logits = ((features[test] - mean) / scale) @ weight + bias
        predictions[test] = 1.0 / (1.0 + np.exp(-logits))
    return float(log_loss(labels, np.clip(predictions, 1e-6, 1 - 1e-6), sample_weight=weights))


# The settings that determine the features (those the probe serves, read by the same fast path).
_FEATURE_KEYS = ("backbone", "image_size", "resize_mode", "mean", "std", "include_head", "zoom_crop", "half_scale")


def _cache_file(cache_dir: Path, detector: ProbeDetector, spec: DatasetSpec, ds, copies: int, seed: int,
                augment: float, views: Sequence[str]) -> Path:  # fmt: skip
    """One file per set of rows and feature settings; the rows' fingerprint makes a rewritten dataset a new file."""
    settings = {key: getattr(detector.settings, key) for key in _FEATURE_KEYS}
    key = json.dumps([settings, str(spec), len(ds), data_fingerprint(ds), copies, seed, augment, list(views)],
                     sort_keys=True, default=str)  # fmt: skip
    return cache_dir / f"features-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _load_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    try:
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        log.warning("feature cache %s is unreadable (%s); extracting again", path, exc)
        return {}


def stream_sample(spec: DatasetSpec, holdout: Sequence[Selector], rows: int, shuffle_buffer: int, seed: int,
                  folder: Path) -> Path:  # fmt: skip
    """`rows` rows of the spec's stream that match no `holdout` selector, shuffled through a buffer of
    `shuffle_buffer` rows, as a local parquet file in the shared layout (written once, atomically; the same
    arguments reuse it). Only the sample is stored, however large the dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = json.dumps([str(spec), [str(h) for h in holdout], rows, shuffle_buffer, seed])
    path = folder / f"stream-{hashlib.sha256(key.encode()).hexdigest()[:16]}.parquet"
    if path.exists():
        log.info("%s: reusing the stream sample %s", spec.name, path)
        return path
    stream = open_stream(spec)
    if holdout:
        stream = select_stream(stream, holdout, keep_matching=False)
    stream = shuffle_stream(stream, seed, shuffle_buffer).take(rows)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image), ("label", pa.int64()), ("source", pa.string()), ("generator", pa.string())])
    written, chunk = 0, []
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as file, pq.ParquetWriter(file, schema) as writer:
        for row in tqdm(stream, total=rows, desc=f"stream {spec.name}", unit="row", leave=False):
            cell = row["image"] or {}
            chunk.append({"image": {"bytes": cell.get("bytes"), "path": cell.get("path")}, "label": int(row["label"]),
                          "source": row["source"] or spec.name, "generator": row["generator"] or ""})  # fmt: skip
            if len(chunk) == 256:
                writer.write_table(pa.Table.from_pylist(chunk, schema))
                written, chunk = written + len(chunk), []
        if chunk:
            writer.write_table(pa.Table.from_pylist(chunk, schema))
            written += len(chunk)
        if not written:
            raise DataError(f"{spec.name}: the stream holds no rows" + (" outside --holdout" if holdout else ""))
    log.info("%s: %d rows sampled from the stream (%d asked) into %s", spec.name, written, rows, path)
    return path


def extract_features(
    detector: ProbeDetector,
    ds,
    spec: DatasetSpec,
    copies: int,
    augment: TrainAugment,
    seed: int,
    cache_dir: Path,
    batch_size: int = 16,
    save_every: int = 512,
    views: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Features of every readable row — clean, then `copies` augmented versions, then one version per operation
    named in `views` (that operation alone) — as (N × V × D, row ids), V = 1 + copies + len(views).

    The features are those the probe serves, computed the way it serves them (ONNX Runtime on a CPU, where
    installed). Version k of row i is drawn from `(seed, i, k)`, so a resumed extraction computes what an
    uninterrupted one would. Progress is saved to the cache every `save_every` rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = _cache_file(cache_dir, detector, spec, ds, copies, seed, augment.strength, views)
    cached = _load_cache(path)
    versions_per_row = 1 + copies + len(views)
    features: list[np.ndarray] = list(cached.get("features", np.zeros((0, versions_per_row, 0))))
    kept: list[int] = cached.get("kept", np.zeros(0, np.int64)).tolist()
    start = int(cached.get("next_row", 0))
    if start:
        log.info("%s: resuming feature extraction at row %d of %d (%s)", spec.name, start, len(ds), path.name)

    width = detector.model.num_features

    def save(next_row: int) -> None:
        stacked = np.stack(features) if features else np.zeros((0, versions_per_row, width))
        buffer = io.BytesIO()
        np.savez(buffer, features=stacked.astype(np.float32), kept=np.asarray(kept, np.int64), next_row=next_row)
        atomic_write_bytes(path, buffer.getvalue())

    started, done, unsaved = time.perf_counter(), 0, 0
    bar = tqdm(total=len(ds), initial=start, desc=f"features {spec.name}", unit="img", leave=False)
    for begin in range(start, len(ds), batch_size):
        rows = range(begin, min(begin + batch_size, len(ds)))
        versions: list[list[torch.Tensor]] = [[] for _ in range(versions_per_row)]
        for row in rows:
            try:
                image = decode_row_image(ds[row]["image"])
            except ImageDecodeError as exc:
                log.warning("%s: row %d is unreadable (%s); skipped", spec.name, row, exc)
                continue
            kept.append(row)
            versions[0].append(detector.transform(image))
            for k in range(1, 1 + copies):
                rng = np.random.default_rng([seed, row, k])
                versions[k].append(detector.transform(augment(image, rng)))
            for k, name in enumerate(views, start=1 + copies):
                versions[k].append(detector.transform(OPERATIONS[name](to_rgb(image), np.random.default_rng([seed, row, k]))))
        if versions[0]:
            per_version = [detector.features(torch.stack(v)).numpy() for v in versions]
            features.extend(np.stack(per_version, axis=1))
        bar.update(len(rows))
        done += len(rows)
        unsaved += len(rows)
        if unsaved >= save_every or rows.stop == len(ds):
            save(rows.stop)
            unsaved = 0
    bar.close()
    if done:
        log.info("%s: %d rows in %.0f s (%.1f images/s incl. %d other versions each)", spec.name, done,
                 time.perf_counter() - started, done * versions_per_row / (time.perf_counter() - started),
                 versions_per_row - 1)  # fmt: skip
    if not features:
        save(len(ds))
    return np.stack(features) if features else np.zeros((0, versions_per_row, width)), np.asarray(kept, np.int64)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitmind-fit-probe", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--detector", default="probe", help="probe detector config: packaged name or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (value parsed as YAML); repeatable")
    parser.add_argument("--train", action="append", required=True, metavar="DATASET",
                        help="training data (same specs as bitmind-train: parquet, imagefolder, hub id, :SPLIT, ?KEY=VALUE, clip datasets with a part frames=N as N frame images each); repeatable")
    parser.add_argument("--holdout", action="append", default=[], metavar="KEY=VALUE",
                        help="leave rows whose source/generator/label equals VALUE out of the fit; repeatable")
    parser.add_argument("--face-crops", action="store_true",
                        help="fit on the face gate's aligned crops (CAMO's face expert); images without a face are dropped")
    parser.add_argument("--gate-config", default="camo", help="CAMO config whose gate makes the face crops")
    parser.add_argument("--copies", type=int, default=1, help="augmented copies of every image besides the clean one")
    parser.add_argument("--augment", type=float, default=0.5, help="strength of the augmented copies (bitmind-train's --augment)")
    parser.add_argument("--views", default="",
                        help=f"comma-separated operations, each adding one more version of every image with that operation "
                        f"alone, applied to real and generated alike (e.g. noise,sharpen: camera traits a head must not "
                        f"read as real-or-generated); of {', '.join(OPERATIONS)}")
    parser.add_argument("--c", default=",".join(str(c) for c in DEFAULT_CS),
                        help="comma-separated inverse L2 strengths; the one with the lowest source-out CV log-loss is used")
    parser.add_argument("--content-clusters", type=int, default=0,
                        help="k-means clusters of image content (the last stage's channel means of the clean images); "
                        "real and generated images are balanced within each, so that topic alone predicts nothing; 0 = off")
    parser.add_argument("--content-strength", type=float, default=0.25,
                        help="how far each cluster's real and generated weights move toward equal: 0 = not at all, 1 = equal; "
                        "above 0 a cluster holding one class only drops out")
    parser.add_argument("--max-rows", type=positive(int), default=None,
                        help="at most this many rows of each --train dataset: a label-stratified seeded subset, or with "
                        "--streaming the first rows of the shuffled stream; default: every row (needed with --streaming)")
    parser.add_argument("--streaming", action="store_true",
                        help="read each --train dataset as a stream (hub ids, parquet) and fit on a sample of --max-rows "
                        "rows, stored once beside the feature cache: a dataset larger than the disk is never downloaded whole")
    parser.add_argument("--shuffle-buffer", type=positive(int), default=10000,
                        help="rows in the stream's shuffle buffer (--streaming); its shards are shuffled too")
    parser.add_argument("--folds", type=int, default=5, help="GroupKFold folds over sources for choosing C")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the augmented copies, the content clusters, --max-rows subsets and the stream shuffle")
    parser.add_argument("--batch-size", type=positive(int), default=16, help="images per forward pass")
    parser.add_argument("--cache-dir", default=None, help="feature cache folder (default: OUT/cache); reused and resumed")
    parser.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when present)")
    parser.add_argument("--out", required=True, help="checkpoint folder: model.safetensors, config.yaml, fit.json")
    return parser


def _balance_content(detector: ProbeDetector, feats: np.ndarray, y_all: np.ndarray, w_all: np.ndarray,
                     args: argparse.Namespace) -> np.ndarray:  # fmt: skip
    """`content_weights` over k-means clusters of the clean images' content columns (every version of an image
    shares its cluster)."""
    if args.content_clusters > len(feats):
        raise ConfigError(f"--content-clusters {args.content_clusters} exceeds the {len(feats)} training images")
    content = feats[:, 0, detector.model.content_columns()]
    content = (content - content.mean(0)) / np.maximum(content.std(0), 1e-6)
    clusters = KMeans(args.content_clusters, n_init=4, random_state=args.seed).fit_predict(content)
    clusters = np.repeat(clusters, feats.shape[1])
    weights = content_weights(w_all, y_all, clusters, args.content_strength)
    mixed = sum(len(np.unique(y_all[clusters == c])) == 2 for c in range(args.content_clusters))
    log.info("content balance: %d clusters, %d hold both classes, strength %g", args.content_clusters, mixed,
             args.content_strength)  # fmt: skip
    return weights


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Extract (or reuse) features, choose C, fit, save the checkpoint and fit.json (what was chosen and seen)."""
    if args.copies < 0 or args.folds < 2 or not 0.0 <= args.augment <= 1.0:
        raise ConfigError("--copies must be >= 0, --folds >= 2 and --augment in [0, 1]")
    if args.content_clusters < 0 or not 0.0 <= args.content_strength <= 1.0:
        raise ConfigError("--content-clusters must be >= 0 and --content-strength in [0, 1]")
    try:
        cs = [float(c) for c in args.c.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--c must be comma-separated numbers, got {args.c!r}") from None
    if not cs or min(cs) <= 0:
        raise ConfigError(f"--c needs positive values, got {args.c!r}")
    try:
        views = parse_operations(args.views)
    except ValueError as exc:
        raise ConfigError(f"--views: {exc}") from None
    holdout = [parse_selector(text) for text in args.holdout]
    if args.streaming and args.max_rows is None:
        raise ConfigError("--streaming needs --max-rows: a stream is sampled, never read whole")
    if args.threads:
        torch.set_num_threads(args.threads)
    detector = build_detector(args.detector, device=args.device, **parse_overrides(args.overrides))
    if not isinstance(detector, ProbeDetector):
        raise ConfigError(f"{args.detector!r} is a {type(detector).__name__}; bitmind-fit-probe fits probe detectors")
    out = Path(args.out)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    augment = TrainAugment(args.augment)
    gate = build_gate(load_config(args.gate_config).get("gate") or "face") if args.face_crops else None
    blocks, labels, groups = [], [], []
    for text in args.train:
        spec = DatasetSpec.parse(text)
        name = spec.name
        if args.streaming:
            spec = DatasetSpec(str(stream_sample(spec, holdout, args.max_rows, args.shuffle_buffer, args.seed, cache_dir)))
            ds = load_spec(spec)
        else:
            ds = stratified_subset(select(load_spec(spec), holdout, keep_matching=False), args.max_rows, args.seed)
        if gate is not None:
            ds, _ = face_crops(ds, gate, desc=f"face crops {spec.name}")
            spec = dataclasses.replace(spec, location=spec.location + "#face-crops")
        if not len(ds):
            raise DataError(f"{name}: no rows left after --holdout" + (" and the face gate" if gate else ""))
        feats, kept = extract_features(
            detector, ds, spec, args.copies, augment, args.seed, cache_dir, args.batch_size, views=views
        )
        if not len(kept):
            raise DataError(f"{name}: none of its {len(ds)} rows holds a readable image")
        blocks.append(feats)
        labels.append(np.asarray(ds["label"])[kept])
        groups.append(np.asarray([f"{name}/{s}" for s in np.asarray(ds["source"])[kept]]))
    feats = np.concatenate(blocks)  # (N, versions, D)
    y, g = np.concatenate(labels), np.concatenate(groups)
    if len(np.unique(y)) < 2:
        raise DataError("the training rows hold one class only; a head needs real and AI-generated images")
    versions = feats.shape[1]
    x = feats.reshape(-1, feats.shape[2])  # row-major: the versions of one image stay together
    y_all, g_all = np.repeat(y, versions), np.repeat(g, versions)
    w_all = group_weights(y_all, g_all)
    if args.content_clusters:
        w_all = _balance_content(detector, feats, y_all, w_all, args)
    folds = min(args.folds, len(np.unique(g_all)))
    scores = {}
    if len(cs) > 1 and folds >= 2:
        for c in cs:
            scores[c] = _cv_loss(x, y_all, w_all, g_all, c, folds)
            log.info("C=%g: source-out CV log-loss %.4f (%d folds)", c, scores[c], folds)
    best = min(scores, key=scores.get) if scores else cs[0]
    mean, scale, weight, bias = fit_head(x, y_all, w_all, best)
    detector.set_head(*(torch.from_numpy(a.astype(np.float32)) for a in (mean, scale, weight)), bias)
    detector.save(out)
    result = dict(
        detector=str(args.detector), c=best, cv_log_loss={str(c): s for c, s in scores.items()}, folds=folds,
        images=int(len(y)), real=int((y == 0).sum()), fake=int((y == 1).sum()), copies=args.copies, views=views,
        max_rows=args.max_rows, streaming=args.streaming,
        content_clusters=args.content_clusters, content_strength=args.content_strength if args.content_clusters else None,
        groups=sorted(set(g.tolist())), holdout=[str(s) for s in holdout], train=list(args.train),
    )  # fmt: skip
    atomic_write_bytes(out / "fit.json", json.dumps(result, indent=2).encode())
    log.info("fitted %s on %d images (%d real, %d fake, %d other versions each), C=%g; saved to %s",
             detector.name, len(y), result["real"], result["fake"], versions - 1, best, out)  # fmt: skip
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv), log,
                       "interrupted; extracted features are cached, run the same command again to continue")


if __name__ == "__main__":
    sys.exit(main())
