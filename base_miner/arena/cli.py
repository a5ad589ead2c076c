"""`bitmind-arena`: evaluate detectors on datasets and write results.json, a markdown leaderboard and PNG plots.

    bitmind-arena --detector camo --detector npr --dataset ../shared/data/cifake:train[96%:] \
        --dataset "../shared/data/diverse?source=urban100-sun80&generator=ai-horde-checkpoints-sdxl-sd15" --out arena/

A detector is a packaged config name (camo, npr, generalist, ...) or a YAML path; a dataset is a parquet file or
folder, an imagefolder with real/ and fake/, or a hub id, with an optional `:SPLIT` and `?KEY=VALUE&...` row
selection (see `base_miner.training.data`). Unreadable rows are counted, reported and skipped.

`--protocol DIR` (the shared `diverse` folder) adds the held-out protocol's rows as a dataset and writes
`protocol.json` / `protocol.md`: every held-out generator family and real collection, per detector
(`base_miner/arena/protocol.py`).

Every result carries subnet 34's benchmark score (`sn34`, `base_miner/export/score.py`); the `sn34_chain` sweep
scores the benchmark's degraded copies and gives `sn34_degraded` and the blended `sn34_blended`. A detector may
also be a package written by `bitmind-export gas` (its folder or zip): it is then fed as the benchmark feeds it, so
"as served" and "as exported" share one table.

A dataset with a `mask` column (`bitmind-semi-synth`) is also scored where it is generated for every detector that
produces generated-pixel maps (segmenter, CAMO with a segmenter expert): pixel IoU / F1 per dataset
(`base_miner/arena/mask_metrics.py`) in results.json, and `--overlays` pictures per detector and dataset in
OUT/overlays/ (the map in grayscale and a red overlay on the image).
"""

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from base_miner.arena.mask_metrics import mask_metrics
from base_miner.arena.metrics import binary_metrics, roc_points
from base_miner.arena.protocol import markdown_table, protocol_report, protocol_spec
from base_miner.arena.report import write_json, write_markdown, write_plots
from base_miner.arena.robustness import SWEEPS, perturb
from base_miner.export.package_detector import as_detector_config
from base_miner.export.score import blend, sn34_score
from base_miner.mask_pictures import write_mask_pictures
from base_miner.registry import ConfigError, build_detector, load_config
from base_miner.training.data import DataError, DatasetSpec, decode_row_image, load_spec, stratified_subset
from base_miner.training.mask_pairs import row_mask
from bitmind.arg_types import positive
from bitmind.atomic import atomic_write_bytes
from bitmind.image_codec import ImageDecodeError

__all__ = ["build_parser", "evaluate", "load_images", "main"]

log = logging.getLogger("bitmind-arena")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitmind-arena", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--detector", action="append", required=True, metavar="CONFIG", help="YAML path or packaged config name; repeatable")
    parser.add_argument("--dataset", action="append", default=[], metavar="DATASET", help="LOCATION[:SPLIT][?KEY=VALUE&...] (clip datasets: a part frames=N makes each clip N frame images); repeatable")
    parser.add_argument("--protocol", default=None, metavar="DIR",
                        help="folder of the shared diverse parquet files: evaluate on the held-out protocol's rows and write protocol.json / protocol.md")
    parser.add_argument("--out", required=True, help="output folder (results.json, leaderboard.md, *.png)")
    parser.add_argument("--max-rows", type=_positive_int, default=0, help="evaluate at most this many rows per dataset (stratified, seeded); 0 = all")
    parser.add_argument("--robustness-rows", type=_positive_int, default=200, help="rows per dataset for the robustness sweeps; 0 = no sweeps")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help="comma-separated robustness sweeps")
    parser.add_argument("--batch-size", type=positive(int), default=32, help="images per predict call")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when present)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row subsets")
    parser.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads")
    parser.add_argument("--overlays", type=_positive_int, default=4,
                        help="map and overlay pictures written per detector and masked dataset (images with a partly generated region first)")  # fmt: skip
    return parser


def load_images(spec: DatasetSpec, max_rows: int, seed: int):
    """(images, labels, sources, rows, unreadable, masks) of a dataset; unreadable rows are logged and left out.
    `masks` (float32 maps, one per image) only when the dataset has a `mask` column, else None."""
    ds = stratified_subset(load_spec(spec), max_rows or None, seed)
    has_masks = "mask" in ds.column_names
    images, labels, sources, masks, unreadable = [], [], [], [], 0
    cells = ds["mask"] if has_masks else [None] * len(ds)
    for index, (cell, label, source, mask_cell) in enumerate(zip(ds["image"], ds["label"], ds["source"], cells)):
        try:
            image = decode_row_image(cell)
            mask = row_mask(mask_cell, image.size, int(label)) if has_masks else None
        except ImageDecodeError as exc:
            unreadable += 1
            log.warning("%s: row %d is unreadable (%s); skipped", spec.name, index, exc)
            continue
        images.append(image)
        labels.append(int(label))
        sources.append(str(source))
        masks.append(mask)
    return images, labels, sources, len(ds), unreadable, (masks if has_masks else None)



def _predict(detector, images: list[Image.Image], batch_size: int, desc: str | None, maps: bool = False):
    """Probabilities, mean milliseconds per image (a progress bar when `desc` is given) and, when `maps`, each
    image's generated-pixel map (None where the detector gave none)."""
    probabilities: list[float] = []
    masks: list[np.ndarray | None] = []
    started = time.perf_counter()
    batches = range(0, len(images), batch_size)
    for start in tqdm(batches, desc=desc, leave=False, unit="batch", disable=desc is None):
        chunk = images[start : start + batch_size]
        if maps:
            predictions = detector.predict_detailed(chunk)
            probabilities.extend(float(p.probability) for p in predictions)
            masks.extend(p.mask for p in predictions)
        else:
            probabilities.extend(float(p) for p in detector.predict(chunk))
    elapsed = time.perf_counter() - started
    return probabilities, (1000.0 * elapsed / len(images)) if images else 0.0, (masks if maps else None)


def _overlay_picks(truths: list[np.ndarray], count: int) -> list[int]:
    """Up to `count` image indices for pictures: partly generated ones first, then the rest, in order."""
    partial = [i for i, t in enumerate(truths) if 0.0 < float(np.mean(t > 0.5)) < 1.0]
    rest = [i for i in range(len(truths)) if i not in set(partial)]
    return (partial + rest)[:count]


def _robustness(detector, images, labels, rows: int, sweeps: Sequence[str], batch_size: int, seed: int):
    """Metrics at every level of every sweep on one stratified, seeded subset of the images."""
    rng = np.random.default_rng(seed)
    chosen = np.arange(len(images))
    if len(images) > rows:
        y = np.asarray(labels)
        chosen = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(y == c), size=min(int((y == c).sum()), round(rows * (y == c).mean())), replace=False)
            for c in (0, 1) if (y == c).any()
        ]))  # fmt: skip
    subset, subset_labels = [images[i] for i in chosen], [labels[i] for i in chosen]
    curves: dict[str, list[dict[str, Any]]] = {}
    for sweep in sweeps:
        curves[sweep] = []
        for level in SWEEPS[sweep].levels:
            perturbed = [perturb(image, sweep, level) for image in subset]
            probabilities, _, _ = _predict(detector, perturbed, batch_size, None)
            m = binary_metrics(subset_labels, probabilities)
            curves[sweep].append({"level": level, "n": m["n"], "accuracy": m["accuracy"], "mcc": m["mcc"], "auc": m["auc"],
                                  "brier": m["brier"], "sn34": sn34_score(subset_labels, probabilities)})  # fmt: skip
    return curves


def _detector_names(configs: Sequence[str]) -> list[str]:
    """Report names: the packaged name, or the YAML's stem (its folder's name for `config.yaml`); made unique."""
    names: list[str] = []
    for config in configs:
        path = Path(config)
        name = path.parent.name if path.suffix and path.stem == "config" else (path.stem if path.suffix else str(config))
        candidate, n = name, 2
        while candidate in names:
            candidate, n = f"{name}#{n}", n + 1
        names.append(candidate)
    return names


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run every detector on every dataset; returns the results.json structure and the ROC points."""
    sweeps = [s.strip() for s in args.sweeps.split(",") if s.strip()]
    unknown = sorted(set(sweeps) - set(SWEEPS))
    if unknown:
        raise ConfigError(f"unknown robustness sweep(s) {unknown}; choose from {list(SWEEPS)}")
    configs = [as_detector_config(config) for config in args.detector]  # exported packages become gas_package
    for config in configs:
        load_config(config)  # a typo fails before any dataset is loaded
    texts = list(args.dataset) + ([protocol_spec(args.protocol)] if args.protocol else [])
    if not texts:
        raise ConfigError("give at least one --dataset or --protocol")
    specs = [DatasetSpec.parse(text) for text in texts]
    protocol_name = specs[-1].name if args.protocol else None
    datasets, sources_of = {}, {}
    masks_of: dict[str, list[np.ndarray] | None] = {}
    for spec in specs:
        images, labels, sources, rows, unreadable, masks = load_images(spec, args.max_rows, args.seed)
        datasets[spec.name] = (spec, images, labels, rows, unreadable)
        sources_of[spec.name] = sources
        masks_of[spec.name] = masks
        log.info("dataset %s: %d rows, %d readable (%d real, %d fake), %d unreadable",
                 spec.name, rows, len(images), labels.count(0), labels.count(1), unreadable)  # fmt: skip
        if not images:
            raise DataError(f"dataset {spec.name!r} ({spec.location}) has no readable row to evaluate on"
                            + (" (is --protocol the folder of the shared diverse parquet files?)"
                               if spec.name == protocol_name else ""))  # fmt: skip
    results: dict[str, Any] = {
        "detectors": {},
        "datasets": {name: {"spec": str(d[0].location), "rows": d[3], "unreadable": d[4]} for name, d in datasets.items()},
    }
    roc: dict[str, dict[str, Any]] = {}
    protocol: dict[str, Any] = {}
    overlays: list[tuple[str, Image.Image, np.ndarray]] = []
    for name, config in zip(_detector_names(args.detector), configs):
        detector = build_detector(config, device=args.device)
        entry: dict[str, Any] = {"config": str(config), "datasets": {}, "robustness": {}}
        roc[name] = {}
        for dataset, (spec, images, labels, rows, unreadable) in datasets.items():
            truths = masks_of[dataset] if detector.produces_masks else None
            probabilities, ms, maps = _predict(detector, images, args.batch_size, f"{name} on {dataset}", truths is not None)
            metrics = binary_metrics(labels, probabilities)
            sn34 = sn34_score(labels, probabilities)
            entry["datasets"][dataset] = {**metrics, "sn34": sn34, "sn34_degraded": None, "sn34_blended": None,
                                          "ms_per_image": ms, "unreadable": unreadable}  # fmt: skip
            if truths is not None:
                maps = [np.zeros_like(t) if m is None else m for m, t in zip(maps, truths)]
                entry["datasets"][dataset]["masks"] = mask_metrics(maps, truths)
                log.info("%s on %s: masks %s", name, dataset, entry["datasets"][dataset]["masks"])
                slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{name}-{dataset}")
                overlays += [(f"{slug}-{i}.png", images[i], maps[i]) for i in _overlay_picks(truths, args.overlays)]
            roc[name][dataset] = roc_points(labels, probabilities) if images else None
            if dataset == protocol_name:
                protocol[name] = protocol_report(labels, probabilities, sources_of[dataset])
            log.info("%s on %s: n %d acc %s mcc %s auc %s ap %s sn34 %s, %.1f ms/image", name, dataset, metrics["n"],
                     metrics["accuracy"], metrics["mcc"], metrics["auc"], metrics["ap"], sn34, ms)  # fmt: skip
            if args.robustness_rows and images and sweeps:
                entry["robustness"][dataset] = _robustness(
                    detector, images, labels, args.robustness_rows, sweeps, args.batch_size, args.seed
                )
                log.info("%s on %s: robustness sweeps %s done on %d images", name, dataset, ",".join(sweeps),
                         min(len(images), args.robustness_rows))  # fmt: skip
                chain = entry["robustness"][dataset].get("sn34_chain")
                if chain:  # the benchmark's robustness pass: level 1 of the chain, blended into the score
                    degraded = chain[-1]["sn34"]
                    entry["datasets"][dataset].update(sn34_degraded=degraded, sn34_blended=blend(sn34, degraded))
        results["detectors"][name] = entry
    return {"results": results, "roc": roc, "protocol": protocol, "overlays": overlays}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)  # before the evaluation, which would otherwise be lost
    except OSError as exc:
        log.error("--out %s: %s", out, exc)
        return 2
    try:
        outcome = evaluate(args)
    except (ConfigError, DataError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted; nothing written")
        return 130
    written = [write_json(outcome["results"], out), write_markdown(outcome["results"], out)]
    written += write_plots(outcome["results"], outcome["roc"], out)
    for filename, image, prob_map in outcome["overlays"]:
        written += write_mask_pictures(image, prob_map, out / "overlays" / filename)
    if outcome["protocol"]:
        written.append(atomic_write_bytes(out / "protocol.json", json.dumps(outcome["protocol"], indent=2).encode()))
        written.append(atomic_write_bytes(out / "protocol.md", markdown_table(outcome["protocol"]).encode()))
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
