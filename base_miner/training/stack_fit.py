"""`bitmind-fit-stack`: fit CAMO's stacked aggregator on images none of its experts trained on.

    bitmind-fit-stack --detector base_miner/configs/camo.yaml --data "../shared/data/diverse?source=lfw&..." \
        --out base_miner/weights/camo/aggregator.json

CAMO runs with its experts on every row; each image's expert outputs become the aggregator's features and a
group-balanced logistic regression is fitted (`aggregator.py`). Before the final fit, every source is predicted by
an aggregator fitted on the other sources (leave-one-source-out), so `report.json` beside the output says how the
stacked CAMO does on sources the aggregator has not seen — with the protocol's per-group table when the rows are
the protocol's held-out groups. Thumbnails taken by the resolution route are left out: they never reach the
aggregator.
"""

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from base_miner.arena.metrics import binary_metrics
from base_miner.arena.protocol import markdown_table, protocol_report, protocol_spec
from base_miner.detectors.aggregator import StackedAggregator
from base_miner.detectors.camo import CAMO
from base_miner.registry import ConfigError, build_detector
from base_miner.training.cli import run_command
from base_miner.training.data import DataError, DatasetSpec, decode_row_image, load_spec
from base_miner.training.probe_fit import group_weights
from bitmind.atomic import atomic_write_bytes
from bitmind.image_codec import ImageDecodeError

__all__ = ["build_parser", "collect_outputs", "fit_stack", "main"]

log = logging.getLogger("bitmind-fit-stack")


def collect_outputs(camo: CAMO, specs: Sequence[DatasetSpec], batch_size: int) -> tuple[list[dict], list[int], list[str]]:
    """Per-image expert outputs, labels and sources of every readable row that CAMO does not send to a thumbnail."""
    outputs, labels, sources = [], [], []
    for spec in specs:
        ds = load_spec(spec)
        for start in tqdm(range(0, len(ds), batch_size), desc=f"experts {spec.name}", unit="batch", leave=False):
            rows = ds[start : start + batch_size]
            images, kept = [], []
            for offset, cell in enumerate(rows["image"]):
                try:
                    images.append(decode_row_image(cell))
                    kept.append(offset)
                except ImageDecodeError as exc:
                    log.warning("%s: row %d is unreadable (%s); skipped", spec.name, start + offset, exc)
            for offset, prediction in zip(kept, camo.predict_detailed(images) if images else []):
                if prediction.route == camo.tiny_expert:
                    continue
                outputs.append(prediction.experts)
                labels.append(int(rows["label"][offset]))
                sources.append(str(rows["source"][offset]))
    return outputs, labels, sources


def fit_stack(camo: CAMO, outputs: list[dict], labels: list[int], sources: list[str], c: float,
              meta: dict[str, Any]) -> tuple[StackedAggregator, np.ndarray]:  # fmt: skip
    """The aggregator fitted on everything, and leave-one-source-out probabilities for every row."""
    y, src = np.asarray(labels), np.asarray(sources)
    optional = list(camo.content_experts)
    held_out = np.full(len(y), np.nan)
    for source in np.unique(src):
        rest = src != source
        if len(np.unique(y[rest])) < 2:
            raise DataError(f"leaving out {source!r} leaves one class only; give more sources of both classes")
        model = StackedAggregator.fit(camo.always, optional, [o for o, r in zip(outputs, rest) if r], y[rest],
                                      group_weights(y[rest], src[rest]), c)  # fmt: skip
        held_out[~rest] = [model.probability(o) for o, r in zip(outputs, rest) if not r]
    return StackedAggregator.fit(camo.always, optional, outputs, y, group_weights(y, src), c, meta), held_out


def _read_outputs(path: Path, data: list[str]) -> dict[str, Any]:
    """Saved expert outputs, refused when they are unreadable or came from other data."""
    try:
        saved = json.loads(path.read_text())
        outputs, labels, sources = saved["outputs"], saved["labels"], saved["sources"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read saved expert outputs {str(path)!r}: {exc}") from exc
    if saved.get("data") != data or not (len(outputs) == len(labels) == len(sources)):
        raise DataError(f"saved expert outputs {str(path)!r} were collected on {saved.get('data')}, not {data}")
    return {"outputs": outputs, "labels": labels, "sources": sources}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitmind-fit-stack", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--detector", default="camo", help="CAMO config (packaged name or YAML path) whose experts are stacked")
    parser.add_argument("--data", action="append", default=[], metavar="DATASET",
                        help="rows no expert trained on (bitmind-train's dataset specs); repeatable")
    parser.add_argument("--protocol", default=None, metavar="DIR",
                        help="add the held-out protocol's rows of this diverse folder (experts fitted with its --holdout selectors never saw them)")
    parser.add_argument("--outputs", default=None, metavar="JSON",
                        help="expert outputs saved by an earlier run (outputs.json beside its --out): refit without running the experts again")
    parser.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the aggregator")
    parser.add_argument("--batch-size", type=int, default=16, help="images per CAMO call")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", required=True, help="aggregator JSON to write; report.json and report.md go beside it")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Collect expert outputs, fit with leave-one-source-out figures, write the aggregator and its report."""
    if args.c <= 0 or args.batch_size < 1 or (args.threads is not None and args.threads < 1):
        raise ConfigError("--c must be > 0, --batch-size and --threads >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = list(args.data) + ([protocol_spec(args.protocol)] if args.protocol else [])
    if not data:
        raise ConfigError("give --data or --protocol")
    camo = build_detector(args.detector, device=args.device, combine="max")
    if not isinstance(camo, CAMO):
        raise ConfigError(f"{args.detector!r} is not a CAMO config")
    out = Path(args.out)
    if args.outputs:
        saved = _read_outputs(Path(args.outputs), data)
        outputs, labels, sources = saved["outputs"], saved["labels"], saved["sources"]
    else:
        specs = [DatasetSpec.parse(text) for text in data]
        outputs, labels, sources = collect_outputs(camo, specs, args.batch_size)
        record = {"data": data, "outputs": outputs, "labels": labels, "sources": sources}
        atomic_write_bytes(out.with_name("outputs.json"), json.dumps(record).encode())
    if not outputs:
        raise DataError("no readable rows to fit the aggregator on")
    meta = {"data": data, "images": len(labels), "fake": int(sum(labels)), "c": args.c}
    aggregator, held_out = fit_stack(camo, outputs, labels, sources, args.c, meta)
    aggregator.save(out)
    report = {
        "leave_one_source_out": binary_metrics(labels, held_out),
        "protocol": protocol_report(labels, held_out, sources),
        "aggregator": aggregator.to_dict(),
    }
    atomic_write_bytes(out.with_name("report.json"), json.dumps(report, indent=2).encode())
    atomic_write_bytes(out.with_name("report.md"), markdown_table({"CAMO (stacked)": report["protocol"]}).encode())
    log.info("aggregator on %d images: leave-one-source-out MCC %.3f AUC %.3f Brier %.3f; coefficients %s; saved %s",
             len(labels), report["leave_one_source_out"]["mcc"], report["leave_one_source_out"]["auc"] or float("nan"),
             report["leave_one_source_out"]["brier"], aggregator.to_dict()["coef"], out)  # fmt: skip
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv), log)


if __name__ == "__main__":
    sys.exit(main())
