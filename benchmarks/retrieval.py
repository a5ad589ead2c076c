"""Retrieval benchmark: recall per augmentation level, false matches on generated images, speed and memory.

    python benchmarks/retrieval.py --data ../shared/data --work /tmp/retrieval-bench

1. Builds an index (`bitmind-index build`'s code) of real images from `--data`: `diverse/train` reals, `cifake-mini`
   reals and the first `faces` rows. The match threshold is fitted on the generated images of `diverse/extra`
   (52 generator labels), which are therefore left out of the false-match count.
2. Recall: indexed images made into validator challenges (its augmenter at each level, then its 256² JPEG), with
   another seed than the calibration's.
3. False matches on the other generated images, from generators the fit never saw: every generated image in
   `diverse/train` (many portraits, next to indexed real faces), and CIFAKE's Stable Diffusion mirrors of the CIFAR
   classes whose real counterparts are indexed (`--cifake-fakes` caps them).
4. Build speed; the index's memory and look-up latency on one core; the same for a synthetic 1 M-entry index
   (clustered random vectors, IVF + 8-bit codes); CAMO's cost per unknown image with and without the index, the two
   measured alternately in one run, on what a miner is served (validator challenges, the validator's default mix of
   augmentation levels, made from generated images the fit never saw) and on raw `diverse/extra` images (real and
   generated, none indexed; its generated ones fitted the shortlist, and unaugmented images reach the keypoint check
   more often: a harder case).
Sizes are flags so the run fits the machine; the table printed at the end names them. An index already complete in
`--work` is reused (delete the folder to rebuild).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("READ_ONLY", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _folder_mb(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.iterdir()) / 2**20


def _evenly(ds, count: int):
    if count >= len(ds):
        return ds
    return ds.select(np.unique(np.linspace(0, len(ds) - 1, count).round().astype(int)))


def _images(spec: str, count: int | None = None) -> list:
    from base_miner.training.data import decode_row_image, load_spec

    ds = load_spec(spec)
    ds = _evenly(ds, count) if count else ds
    return [decode_row_image(cell) for cell in ds["image"]]


def build(args, work: Path) -> tuple[dict, float]:
    from base_miner.retrieval.builder import BuildOptions, build_index
    from base_miner.retrieval.cli import validator_challenge
    from base_miner.retrieval.descriptor import Descriptor
    from base_miner.retrieval.index import MANIFEST

    if (work / MANIFEST).exists():
        return json.loads((work / MANIFEST).read_text()), float("nan")
    data = args.data
    datasets = [f"{data}/diverse/train.parquet:train[:{args.diverse_rows}]?label=0",
                f"{data}/cifake-mini/train.parquet:train[:{args.cifake_rows}]?label=0",
                f"{data}/diverse/faces.parquet:train[:{args.faces}]"]  # fmt: skip
    negatives = [f"{data}/diverse/extra.parquet?label=1"]
    challenge, levels = validator_challenge()
    started = time.perf_counter()
    manifest = build_index(datasets, work, Descriptor(), challenge, levels, negatives,
                           BuildOptions(calibration_images=args.calibration_images))  # fmt: skip
    return manifest, manifest["images"] / (time.perf_counter() - started)


def recall(args, expert, manifest: dict) -> dict[str, dict]:
    """Share of challenges matched to the right image, per indexed dataset and level (`--recall-images` in all)."""
    from base_miner.retrieval.cli import validator_challenge

    challenge, levels = validator_challenge()
    indexed = [d for d in manifest["datasets"] if d["indexed"]]
    per_spec = max(1, args.recall_images // len(indexed))
    out, first = {}, 0
    for counts in indexed:
        from base_miner.training.data import load_spec

        rows = np.unique(np.linspace(0, counts["indexed"] - 1, min(per_spec, counts["indexed"])).round().astype(int))
        images = _images(counts["spec"], per_spec)  # the same evenly spaced rows: every row of these specs is indexed
        assert len(load_spec(counts["spec"])) == counts["indexed"], "recall needs specs whose rows are all indexed"
        shares = {}
        for level in levels:
            queries = [challenge(image, np.random.default_rng([1, n, level]), level) for n, image in enumerate(images)]
            found = expert.lookup(queries)
            shares[level] = float(np.mean([m is not None and m.image == first + row for m, row in zip(found, rows)]))
        out[counts["spec"]] = shares | {"images": len(images)}
        first += counts["indexed"]
    return out


def false_matches(args, expert) -> dict[str, dict]:
    data = args.data
    groups = {
        "diverse/train generated (portraits, SD tiles, SDXL)": (f"{data}/diverse/train.parquet?label=1", None),
        "CIFAKE generated (mirrors of indexed CIFAR reals)": (f"{data}/cifake?label=1", args.cifake_fakes or None),
    }
    out = {}
    for name, (spec, cap) in groups.items():
        matched = total = 0
        images = _images(spec, cap)
        for start in range(0, len(images), 64):
            found = expert.lookup(images[start : start + 64])
            matched += sum(m is not None for m in found)
            total += len(found)
        out[name] = {"images": total, "false_matches": matched, "rate": matched / max(total, 1)}
    return out


def latency(expert, unknown: list, known: list, repeats: int = 2) -> dict[str, float]:
    """ms per image on one core, batches of 8: the descriptor alone, the search + score alone, and the whole look-up
    (keypoints too where the score reaches the shortlist) on images not in the index and on indexed ones."""
    import torch

    torch.set_num_threads(1)

    def per_image(run, items) -> float:
        run(items[:8])
        started = time.perf_counter()
        for _ in range(repeats):
            for start in range(0, len(items), 8):
                run(items[start : start + 8])
        return (time.perf_counter() - started) * 1000 / (repeats * len(items))

    vectors = expert.descriptor.embed(unknown)
    return {
        "embed_ms": per_image(expert.descriptor.embed, unknown),
        "search_ms": per_image(expert.index.scores, vectors),
        "lookup_unknown_ms": per_image(expert.lookup, unknown),
        "lookup_known_ms": per_image(expert.lookup, known),
    }


def synthetic(entries: int, views: int = 28, seed: int = 0) -> dict[str, float]:
    """A clustered synthetic index (`views` noisy copies of each random centre): build time, memory, search time."""
    import faiss

    from base_miner.retrieval.index import RetrievalIndex
    from base_miner.retrieval.local import KEYPOINTS

    rng = np.random.default_rng(seed)
    images = entries // views
    # Keypoints are memory-mapped from disk when serving; untouched zero pages stand in for them here.
    local = {"points": np.zeros((images, KEYPOINTS, 2), np.float32), "counts": np.zeros(images, np.int32),
             "descriptors": np.zeros((images, KEYPOINTS, 32), np.uint8), "sizes": np.zeros((images, 2), np.int32)}  # fmt: skip
    centres = rng.standard_normal((images, 192), dtype=np.float32)
    vectors = np.repeat(centres, views, axis=0) + 0.6 * rng.standard_normal((images * views, 192), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    owners = np.repeat(np.arange(images), views)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    index = RetrievalIndex.create(vectors, owners, local)
    build_s = time.perf_counter() - started
    del vectors
    # faiss holds in memory what it serialises (codes, ids, lists, transforms); owners come on top.
    ram_mb = (len(faiss.serialize_index(index.search_index)) + owners.nbytes) / 2**20
    faiss.omp_set_num_threads(1)
    truth = rng.integers(0, images, 1000)
    queries = centres[truth] + 0.6 * rng.standard_normal((1000, 192), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index.scores(queries[:8])
    started = time.perf_counter()
    for start in range(0, len(queries), 8):
        index.scores(queries[start : start + 8])
    search_ms = (time.perf_counter() - started) * 1000 / len(queries)
    top1 = float(np.mean(index.scores(queries)[1] == truth))  # IVF probes only some lists: does it still find it?
    keypoints_mb = images * (KEYPOINTS * (2 * 4 + 32) + 2 * 4) / 2**20
    return {"entries": images * views, "images": images, "kind": index.settings["kind"], "build_s": build_s,
            "ram_mb": ram_mb, "search_ms": search_ms, "top1": top1, "keypoints_disk_mb": keypoints_mb}  # fmt: skip


def camo_cost(images: list, config: str, index: Path, repeats: int = 3) -> dict[str, float] | str:
    """CAMO's ms per image at batch 8 on one core without and with the index, on images not in it (or why it could
    not run). The two arms alternate batch by batch (and which goes first), so a machine whose load changes during
    the run (other jobs) weighs on both alike; `ratio` is what the index costs a miner on unknown challenges."""
    import torch

    from base_miner.registry import ConfigError, build_detector

    torch.set_num_threads(1)
    try:
        arms = {"without": build_detector(config, device="cpu"),
                "with": build_detector(config, device="cpu", retrieval={"index": str(index)})}  # fmt: skip
    except ConfigError as exc:
        return f"not measured: {exc}"
    seconds = dict.fromkeys(arms, 0.0)
    for camo in arms.values():
        camo.predict(images[:8])
    for repeat in range(repeats):
        for number, start in enumerate(range(0, len(images), 8)):
            order = list(arms) if (repeat + number) % 2 == 0 else list(reversed(arms))
            for name in order:
                started = time.perf_counter()
                arms[name].predict(images[start : start + 8])
                seconds[name] += time.perf_counter() - started
    ms = {f"{name}_ms": total * 1000 / (repeats * len(images)) for name, total in seconds.items()}
    return ms | {"ratio": ms["with_ms"] / ms["without_ms"]}


def served_sample(data: str, count: int = 64, seed: int = 3, spec: str | None = None) -> list:
    """What a miner is served when the challenge is generated: `count` generated `diverse/train` images (not the
    fitting set), or `count` rows of `spec`, made into validator challenges at levels drawn from the validator's
    default mix."""
    from base_miner.retrieval.cli import validator_challenge
    from validator.augment import DEFAULT_LEVEL_PROBS

    make, _ = validator_challenge()
    levels, weights = list(DEFAULT_LEVEL_PROBS), np.array(list(DEFAULT_LEVEL_PROBS.values()))
    rng = np.random.default_rng(seed)
    return [make(image, rng, int(rng.choice(levels, p=weights / weights.sum())))
            for image in _images(spec or f"{data}/diverse/train.parquet?label=1", count)]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data", help="the shared data folder")
    parser.add_argument("--work", default="/tmp/retrieval-bench", help="index folder (reused when complete)")
    parser.add_argument("--diverse-rows", type=int, default=3973, help="diverse/train rows whose reals are indexed")
    parser.add_argument("--cifake-rows", type=int, default=1000, help="cifake-mini rows whose reals are indexed")
    parser.add_argument("--faces", type=int, default=2156, help="faces rows indexed")
    parser.add_argument("--calibration-images", type=int, default=250, help="indexed images challenged to fit the threshold")
    parser.add_argument("--recall-images", type=int, default=300, help="indexed images challenged at each level")
    parser.add_argument("--cifake-fakes", type=int, default=0, help="CIFAKE generated images checked (0: all 24,954)")
    parser.add_argument("--synthetic-entries", type=int, default=1_000_000, help="entries of the synthetic index (0: skip)")
    parser.add_argument("--camo-config", default="camo", help="CAMO config whose per-image cost is measured without and with the index")
    parser.add_argument("--report", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import faiss
    import torch

    from base_miner.retrieval.expert import RetrievalExpert

    torch.set_num_threads(1)
    work = Path(args.work)
    manifest, build_rate = build(args, work)
    expert = RetrievalExpert.load(work)
    faiss.omp_set_num_threads(1)
    results = {"index": {k: manifest[k] for k in ("images", "entries", "search", "calibration")},
               "build_images_per_s": build_rate}  # fmt: skip
    stages = {
        "recall": lambda: recall(args, expert, manifest),
        "false_matches": lambda: false_matches(args, expert),
        "latency": lambda: latency(expert, sample, known) | {"index_mb": _folder_mb(work)},
        "camo": lambda: {"served": camo_cost(served_sample(args.data), args.camo_config, work),
                         "raw": camo_cost(sample, args.camo_config, work)},
        "synthetic": lambda: synthetic(args.synthetic_entries) if args.synthetic_entries else None,
    }
    from base_miner.retrieval.cli import validator_challenge

    sample = _images(f"{args.data}/diverse/extra.parquet", 64)
    make, _ = validator_challenge()
    known = [make(image, np.random.default_rng([2, n]), 1)
             for n, image in enumerate(_images(manifest["datasets"][0]["spec"], 64))]  # fmt: skip
    for name, stage in stages.items():
        results[name] = stage()
        if args.report:  # after every stage: a late failure keeps the earlier numbers
            Path(args.report).write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))
    print(table(results))
    return 0


def table(r: dict) -> str:
    from base_miner.retrieval.calibration import Calibration

    cal = r["index"]["calibration"]
    rows = [
        "| measure | value |", "|---|---|",
        f"| index | {r['index']['images']} real images, {r['index']['entries']} entries, {r['index']['search']['kind']} |",
        f"| match rule (fitted on {cal['negatives']} diverse/extra generated) | "
        f"{Calibration.from_dict(cal).describe()}; answers p = {cal['probability']:.2g} |",
        f"| build speed (one core) | {r['build_images_per_s']:.2f} images/s |",
    ]  # fmt: skip
    for spec, shares in r["recall"].items():
        levels = " / ".join(f"{share:.2f}" for level, share in shares.items() if level != "images")
        rows.append(f"| recall, levels 0 / 1 / 2 / 3: {spec} ({shares['images']} images) | {levels} |")
    for name, fm in r["false_matches"].items():
        rows.append(f"| false matches: {name} | {fm['false_matches']} / {fm['images']} = {fm['rate']:.3%} |")
    lat = r["latency"]
    rows += [
        f"| look-up, this index, one core: descriptor / search + score | {lat['embed_ms']:.1f} / {lat['search_ms']:.2f} ms per image |",
        f"| whole look-up: image not indexed / level-1 copy of an indexed one | {lat['lookup_unknown_ms']:.1f} / {lat['lookup_known_ms']:.1f} ms per image |",
        f"| index folder on disk (vectors in RAM, keypoints memory-mapped) | {lat['index_mb']:.1f} MB |",
    ]  # fmt: skip
    for name, what in (("served", "served generated challenges"), ("raw", "raw diverse/extra images")):
        c = r["camo"][name]
        rows.append(
            f"| CAMO per image not in the index ({what}), one core, arms interleaved: without / with the index | "
            f"{c['without_ms']:.1f} / {c['with_ms']:.1f} ms (+{100 * (c['ratio'] - 1):.0f} %; throughput "
            f"{100 * (1 / c['ratio'] - 1):+.0f} %) |"
        )  # fmt: skip
    if r.get("synthetic"):
        s = r["synthetic"]
        rows += [
            f"| synthetic {s['entries']:,} entries = {s['images']:,} images ({s['kind']}) | vectors + owners in RAM {s['ram_mb']:.0f} MB, built in {s['build_s']:.0f} s; keypoints on disk {s['keypoints_disk_mb']:.0f} MB |",
            f"| synthetic search + score | {s['search_ms']:.2f} ms per image (one core); right image first {s['top1']:.3f} |",
        ]  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
