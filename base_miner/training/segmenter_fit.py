"""`bitmind-fit-segmenter`: train a segmenter's decoder on cached features of its frozen encoder.

    bitmind-fit-segmenter --train semi/train.parquet --val semi/heldout.parquet --out runs/segmenter

Why cached: with the encoder frozen, every training view's encoder features are the same each epoch, so they are
computed once (`--views` augmented views per row, `mask_pairs.PairedAugment`, the same transforms `bitmind-train`
applies) and the light decoder then trains for many epochs in the time one encoder pass over the data takes.
`bitmind-train --detector segmenter` trains the same model with the same loss end to end (needed when
`trainable_stages` > 0); this is the fast path on a CPU. The loss is the detector's own (`map_loss`). With
`--cache FILE` the features are kept on disk and reused by a later run with the same data, views, augmentation,
seed and encoder (a different one recomputes them).
"""

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from base_miner.arena.mask_metrics import mask_metrics
from base_miner.arena.metrics import binary_metrics
from base_miner.detectors.segmenter import SegmenterDetector
from base_miner.registry import ConfigError, build_detector
from base_miner.training.cli import parse_overrides, run_command
from base_miner.training.data import data_fingerprint, decode_row_image, load_spec
from base_miner.training.mask_pairs import PairedAugment, align_mask_columns, row_mask
from bitmind.arg_types import positive
from bitmind.atomic import atomic_writer
from bitmind.image_codec import ImageDecodeError

__all__ = ["build_parser", "cache_features", "evaluate", "fit_decoder", "main"]

log = logging.getLogger("bitmind-fit-segmenter")


def _rows(specs: Sequence[str]):
    from datasets import concatenate_datasets

    return concatenate_datasets(align_mask_columns([load_spec(spec) for spec in specs]))


def _pairs(ds, views: int, augment: PairedAugment | None, size: int, seed: int):
    """(image, mask, label) for every row and view; rows with an unreadable image or mask are skipped."""
    masks = ds["mask"] if "mask" in ds.column_names else [None] * len(ds)
    for view in range(views):
        for index, (cell, mask_cell, label) in enumerate(zip(ds["image"], masks, ds["label"])):
            try:
                image = decode_row_image(cell)
                mask = row_mask(mask_cell, image.size, int(label))
            except ImageDecodeError as exc:
                log.warning("row %d skipped: %s", index, exc)
                continue
            if augment is not None:
                image, mask = augment(image, mask, size, np.random.default_rng([seed, view, index]))
            yield image, mask, int(label)


@torch.inference_mode()
def cache_features(detector: SegmenterDetector, ds, views: int, augment: PairedAugment, seed: int, batch: int = 32):
    """(encoder features per tap as fp16, masks pooled to the map grid, labels) of every training view."""
    size, model = detector.settings.image_size, detector.model
    grid = size // 4
    taps: list[list[torch.Tensor]] = []
    masks, labels, pending = [], [], []

    def flush() -> None:
        tensors = torch.stack([detector.transform(image) for image, _, _ in pending])
        features = model.encode(tensors)
        if not taps:
            taps.extend([] for _ in features)
        for store, feature in zip(taps, features):
            store.append(feature.half())
        pooled = F.adaptive_avg_pool2d(torch.from_numpy(np.stack([m for _, m, _ in pending])).unsqueeze(1), grid)
        masks.append(pooled.half())
        labels.extend(label for _, _, label in pending)
        pending.clear()

    model.eval()
    for item in tqdm(_pairs(ds, views, augment, size, seed), total=views * len(ds), desc="encoder features", unit="image"):
        pending.append(item)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    if not labels:
        raise ConfigError("no readable training row")
    return [torch.cat(store) for store in taps], torch.cat(masks), torch.tensor(labels)


def fit_decoder(detector: SegmenterDetector, features, masks, labels, epochs: int, batch: int, lr: float, seed: int):
    """AdamW with cosine decay on the decoder (the parameters that require gradients); returns the loss per epoch."""
    model = detector.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(labels) / batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for epoch in range(epochs):
        order, total, started = torch.randperm(len(labels), generator=generator), 0.0, time.perf_counter()
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            maps = model.decode([f[index].float() for f in features])
            loss = detector.map_loss(maps, labels[index], masks[index, 0].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        history.append(total / len(labels))
        log.info("epoch %d/%d loss %.4f (%s) %.1fs", epoch + 1, epochs, history[-1],
                 " ".join(f"{k} {v:.3f}" for k, v in detector.last_loss_terms.items()), time.perf_counter() - started)  # fmt: skip
    model.eval()
    return history


def evaluate(detector: SegmenterDetector, ds) -> dict:
    """Image-level metrics and mask metrics of the detector on rows with masks (served path: `predict_detailed`)."""
    images, truths, labels = [], [], []
    for image, mask, label in _pairs(ds, 1, None, detector.settings.image_size, 0):
        images.append(image)
        truths.append(mask)
        labels.append(label)
    predictions = detector.predict_detailed(images)
    probabilities = [p.probability for p in predictions]
    report = {"image": binary_metrics(labels, probabilities), "mask": mask_metrics([p.mask for p in predictions], truths)}
    # Image-level figures per kind of truth: no generated pixel, a partly generated image, a whole fake.
    areas = np.array([float(np.mean(t > 0.5)) for t in truths])
    for kind, chosen in (("real", areas == 0.0), ("semi", (areas > 0.0) & (areas < 1.0)), ("generated", areas == 1.0)):
        index = np.flatnonzero(chosen)
        report[f"image_{kind}"] = binary_metrics([labels[i] for i in index], [probabilities[i] for i in index])
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitmind-fit-segmenter", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--detector", default="segmenter", help="segmenter config: YAML path or packaged name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value); weights=null is implied")  # fmt: skip
    parser.add_argument("--train", action="append", required=True, metavar="DATASET", help="rows with image/label and optional mask; repeatable")
    parser.add_argument("--val", action="append", default=[], metavar="DATASET", help="evaluated after fitting; repeatable")
    parser.add_argument("--views", type=int, default=1, help="augmented views of every training row")
    parser.add_argument("--augment", type=float, default=0.5, help="paired augmentation strength in [0, 1]")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the cached views")
    parser.add_argument("--batch-size", type=positive(int), default=64, help="views per optimisation step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (one-cycle)")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, views and order")
    parser.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads")
    parser.add_argument("--cache", default=None, metavar="FILE", help="keep the cached features in FILE and reuse them when they match")
    parser.add_argument("--out", required=True, help="checkpoint folder (model.safetensors + config.yaml)")
    return parser


# Settings that change only the decoder or the loss: features cached under other values still fit.
_DECODER_KEYS = {"width", "topk_fraction", "mask_weight", "dice_weight", "image_weight", "batch_size", "weights", "name"}


def _load_cache(path: str | None, key: dict):
    """The cached (features, masks, labels) in `path` when it was made with `key`, else None."""
    if not path or not Path(path).is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: recompute instead of failing the run
        log.warning("feature cache %s unreadable (%s: %s); recomputing", path, type(exc).__name__, exc)
        return None
    if stored.get("key") != json.dumps(key, sort_keys=True):
        log.info("feature cache %s was made with other data or settings; recomputing", path)
        return None
    log.info("reusing the feature cache %s", path)
    return stored["data"]


def _run(args: argparse.Namespace) -> None:
    for name in ("views", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 <= args.augment <= 1.0 or not 0.0 < args.lr < 1.0:
        raise ValueError(f"--augment must be in [0, 1] and --lr in (0, 1), got {args.augment}, {args.lr}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    detector = build_detector(args.detector, device="cpu", **{**parse_overrides(args.overrides), "weights": None})
    if not isinstance(detector, SegmenterDetector) or detector.settings.trainable_stages:
        raise ConfigError("bitmind-fit-segmenter fits a segmenter with a frozen encoder (trainable_stages: 0); "
                          "use bitmind-train otherwise")  # fmt: skip
    rows = _rows(args.train)
    key = {"train": list(args.train), "rows": len(rows), "fingerprint": data_fingerprint(rows), "views": args.views,
           "augment": args.augment, "seed": args.seed,
           "config": {k: v for k, v in detector.export_config().items() if k not in _DECODER_KEYS}}  # fmt: skip
    cached = _load_cache(args.cache, key)
    if cached is None:
        cached = cache_features(detector, rows, args.views, PairedAugment(args.augment), args.seed)
        if args.cache:
            with atomic_writer(args.cache) as handle:
                torch.save({"key": json.dumps(key, sort_keys=True), "data": cached}, handle)
    features, masks, labels = cached
    log.info("cached %d views (%d generated, %d real), %.0f MB", len(labels), int(labels.sum()),
             int((labels == 0).sum()), sum(f.numel() * 2 for f in features) / 1e6)  # fmt: skip
    fit_decoder(detector, features, masks, labels, args.epochs, args.batch_size, args.lr, args.seed)
    detector.save(args.out)
    for spec in args.val:
        report = evaluate(detector, load_spec(spec))
        log.info("val %s: %s", spec, report)


def main(argv: Sequence[str] | None = None) -> int:
    """Returns 0, 2 on bad input, 130 when interrupted."""
    return run_command(_run, build_parser().parse_args(argv), log)


if __name__ == "__main__":
    sys.exit(main())
