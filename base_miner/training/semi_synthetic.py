"""`bitmind-semi-synth`: build a parquet of semi-synthetic training (or evaluation) images with their masks.

    bitmind-semi-synth --data ../shared/data/diverse --split train --rows 3000 --out semi/train.parquet
    bitmind-semi-synth --data ../shared/data/diverse --split heldout --rows 600 --out semi/heldout.parquet

Three kinds of rows, drawn per row from `--kinds`: `semi` — a real image with a region taken from a generated
one (`validator.challenges.splice.make_semi_synthetic`: feathered random region, colours matched), label 1;
`generated` — a whole generated image (mask all ones), label 1; `real` — a real image (empty mask), label 0.
Every row then goes through one JPEG re-compression at a quality drawn from the validator's range
(`validator.augment.JPEG_QUALITY`), so compression carries no label and no region boundary.

`--split` follows the held-out protocol (`base_miner/arena/protocol.py`): `train` never uses a held-out source,
`heldout` takes real images only from the held-out real collections and regions only from the held-out
generator families, `all` uses everything. Columns: image and mask (PNG of `bitmind.mask_codec`) as
`datasets.Image` cells, label, source and generator (of the generated part; the real image's for real rows),
kind, area (share of generated pixels). Row `i` depends only on `(--seed, i)`.
"""

import argparse
import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from base_miner.arena.protocol import HELDOUT_FAMILIES, HELDOUT_REAL, heldout_sources
from base_miner.training.data import DataError, decode_row_image, load_spec
from bitmind.atomic import atomic_writer
from bitmind.image_codec import ImageDecodeError
from bitmind.mask_codec import mask_to_png
from validator.augment import JPEG_QUALITY
from validator.challenges.splice import make_semi_synthetic

__all__ = ["KINDS", "build_rows", "main", "split_rows", "write_parquet"]

log = logging.getLogger("bitmind-semi-synth")

KINDS = ("semi", "generated", "real")
SPLITS = ("train", "heldout", "all")
MAX_ROWS = 1_000_000
MAX_DRAWS = 8  # a row tries this many source images before it is given up as unreadable


def split_rows(sources: Sequence[str], labels: Sequence[int], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(real row indices, generated row indices) that `split` allows."""
    src, y = np.asarray(sources, dtype=object), np.asarray(labels)
    if split == "train":
        allowed = ~np.isin(src, sorted(heldout_sources()))
        real_ok = fake_ok = allowed
    elif split == "heldout":
        real_ok = np.isin(src, [s for group in HELDOUT_REAL.values() for s in group])
        fake_ok = np.isin(src, [s for group in HELDOUT_FAMILIES.values() for s in group])
    elif split == "all":
        real_ok = fake_ok = np.ones(len(src), dtype=bool)
    else:
        raise DataError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    return np.flatnonzero(real_ok & (y == 0)), np.flatnonzero(fake_ok & (y == 1))


def _parse_kinds(text: str) -> dict[str, float]:
    shares: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if name not in KINDS or not 0.0 <= share < float("inf") or name in shares:
            raise argparse.ArgumentTypeError(f"--kinds takes KIND=SHARE,... with KIND in {list(KINDS)}, got {part!r}")
        shares[name] = share
    if sum(shares.values()) <= 0:
        raise argparse.ArgumentTypeError(f"--kinds needs a positive share, got {text!r}")
    return shares


def _jpeg(image: Image.Image, rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
    return buffer.getvalue()


def _draw(ds, pool: np.ndarray, rng: np.random.Generator) -> tuple[int, Image.Image] | None:
    """A readable image from `pool`, or None after MAX_DRAWS unreadable ones."""
    for _ in range(MAX_DRAWS):
        index = int(pool[int(rng.integers(len(pool)))])
        try:
            return index, decode_row_image(ds[index]["image"])
        except ImageDecodeError as exc:
            log.warning("row %d of the source data is unreadable (%s); drawing another", index, exc)
    return None


def build_rows(ds, split: str, rows: int, kinds: dict[str, float], seed: int) -> tuple[dict[str, list], int]:
    """The columns of `rows` generated rows (and how many were given up) from a dataset with the shared layout."""
    reals, fakes = split_rows(ds["source"], ds["label"], split)
    wanted = {kind for kind, share in kinds.items() if share > 0}
    if not len(reals) and wanted & {"semi", "real"}:
        raise DataError(f"split {split!r} leaves no real image to build {sorted(wanted & {'semi', 'real'})} rows from")
    if not len(fakes) and wanted & {"semi", "generated"}:
        raise DataError(f"split {split!r} leaves no generated image for {sorted(wanted & {'semi', 'generated'})} rows")
    names = list(kinds)
    p = np.array([kinds[name] for name in names], dtype=np.float64)
    p /= p.sum()
    columns: dict[str, list[Any]] = {k: [] for k in ("image", "mask", "label", "source", "generator", "kind", "area")}
    skipped = 0
    for i in tqdm(range(rows), desc=f"semi-synthetic {split}", unit="image"):
        rng = np.random.default_rng([seed, i])
        kind = names[int(rng.choice(len(names), p=p))]
        real = _draw(ds, reals, rng) if kind in ("semi", "real") else None
        donor = _draw(ds, fakes, rng) if kind in ("semi", "generated") else None
        if (kind != "generated" and real is None) or (kind != "real" and donor is None):
            skipped += 1
            continue
        if kind == "semi":
            image, mask = make_semi_synthetic(real[1], donor[1], rng)
        else:
            image = (real or donor)[1]
            mask = np.full((image.height, image.width), float(kind == "generated"), dtype=np.float32)
        origin = ds[donor[0] if donor else real[0]]
        columns["image"].append({"bytes": _jpeg(image, rng), "path": f"{kind}-{i:07d}.jpg"})
        columns["mask"].append({"bytes": mask_to_png(mask), "path": f"{kind}-{i:07d}.png"})
        columns["label"].append(int(kind != "real"))
        columns["source"].append(str(origin["source"]))
        columns["generator"].append(str(origin["generator"] or "") if donor else "")
        columns["kind"].append(kind)
        columns["area"].append(float(mask.mean()))
    return columns, skipped


def write_parquet(columns: dict[str, list], out: Path) -> Path:
    """Write the rows atomically as a parquet `datasets.load_dataset('parquet', ...)` reads with Image cells."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    ds = Dataset.from_dict(columns)
    ds = ds.cast_column("image", ImageFeature(decode=False)).cast_column("mask", ImageFeature(decode=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out) as handle:
        ds.to_parquet(handle)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitmind-semi-synth",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", action="append", required=True, metavar="DATASET",
                        help="source rows with image/label/source/generator: LOCATION[:SPLIT][?KEY=VALUE&...]; repeatable")  # fmt: skip
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="train: no held-out source; heldout: only the protocol's held-out reals and families")  # fmt: skip
    parser.add_argument("--rows", type=int, default=3000, help="rows to write")
    parser.add_argument("--kinds", type=_parse_kinds, default="semi=0.5,generated=0.25,real=0.25",
                        help="relative shares of the row kinds semi, generated and real")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="row i is drawn from (seed, i)")
    parser.add_argument("--out", required=True, help="parquet file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Returns 0, or 2 on a usage or data error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 1 <= args.rows <= MAX_ROWS:
        log.error("--rows must be in 1..%d, got %d", MAX_ROWS, args.rows)
        return 2
    try:
        from datasets import concatenate_datasets

        ds = concatenate_datasets([load_spec(text).select_columns(["image", "label", "source", "generator"])
                                   for text in args.data])  # fmt: skip
        columns, skipped = build_rows(ds, args.split, args.rows, args.kinds, args.seed)
        if not columns["kind"]:
            raise DataError(f"no row could be made: all {skipped} were given up (no readable image in the "
                            f"{args.split!r} split of {', '.join(args.data)})")
    except DataError as exc:
        log.error("%s", exc)
        return 2
    out = write_parquet(columns, Path(args.out))
    kinds = {kind: columns["kind"].count(kind) for kind in KINDS}
    semi = [a for a, k in zip(columns["area"], columns["kind"]) if k == "semi"]
    log.info("wrote %s: %d rows %s, semi-synthetic region %.1f%% of the image on average, %d rows given up",
             out, len(columns["kind"]), kinds, 100 * float(np.mean(semi)) if semi else 0.0, skipped)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
