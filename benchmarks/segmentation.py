"""What segmentation adds to serving: ms per 256² image of the segmenter alone (map and image probability, map
resized back to the image, as the miner gets it), of encoding the map for the wire, and of CAMO with and without
the segmenter expert.

    python benchmarks/segmentation.py --threads 1 --repeats 5

Prints the median over `--repeats` runs of each figure at batch 1 and 8 (the miner's CPU batch), on `--threads`
torch threads. Timings depend on the machine and on what else runs on it: compare figures from one run.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("READ_ONLY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.miner_throughput import challenge_images  # noqa: E402
from base_miner.registry import build_detector  # noqa: E402
from bitmind.mask_codec import encode_mask  # noqa: E402


def ms_per_image(run, images, batch: int, repeats: int) -> float:
    """Median over `repeats` of the ms per image of `run` over `images` in chunks of `batch` (after one warm-up)."""
    run(images[:batch])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(images), batch):
            run(images[start : start + batch])
        times.append(1000.0 * (time.perf_counter() - started) / len(images))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segmenter", default="segmenter", help="segmenter config")
    parser.add_argument("--camo", default="camo", help="CAMO config without the segmenter")
    parser.add_argument("--camo-segmenter", default="camo_segmenter", help="CAMO config with the segmenter expert")
    parser.add_argument("--images", type=int, default=16, help="256² images per timed pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the median is printed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--skip-camo", action="store_true", help="time only the segmenter and the mask encoding")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = challenge_images(args.images)
    segmenter = build_detector(args.segmenter, device="cpu")
    maps = [p.mask for p in segmenter.predict_detailed(images)]
    print(f"torch threads {torch.get_num_threads()}, {len(images)} images of 256², median of {args.repeats} passes")
    for batch in (1, 8):
        ms = ms_per_image(segmenter.predict_detailed, images, batch, args.repeats)
        print(f"segmenter (map + probability)   batch {batch}: {ms:6.1f} ms/image")
    encode = ms_per_image(lambda chunk: [encode_mask(m) for m in chunk], maps, 8, args.repeats)
    print(f"mask encoding for the wire      : {encode:6.1f} ms/image")
    if not args.skip_camo:
        for batch in (1, 8):
            plain = ms_per_image(build_detector(args.camo, device="cpu").predict_detailed, images, batch, args.repeats)
            with_seg = ms_per_image(build_detector(args.camo_segmenter, device="cpu").predict_detailed, images, batch,
                                    args.repeats)  # fmt: skip
            print(f"CAMO batch {batch}: {plain:6.1f} ms/image, with segmenter {with_seg:6.1f} ms/image, "
                  f"added {with_seg - plain:+6.1f} ms/image")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
