"""What scoring miners' masks costs a validator step: ms per returned 256² mask (decode with the codec's limits,
IoU and F1 against the truth), for a clean mask (a region with a soft edge, what a segmenter returns after
thresholding) and a noisy one (a soft probability map: the largest PNG a real miner sends), and the ms of a
refused oversized payload.

    python benchmarks/mask_scoring.py --repeats 200

Prints the median of `--repeats` runs of each figure and the payload sizes. Multiply by the miners queried per step
(`--neuron.sample_size`) for the per-step cost. Timings depend on the machine and on what else runs on it.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bitmind.mask_codec import MAX_MASK_BYTES, encode_mask  # noqa: E402
from validator.mask_score import score_mask  # noqa: E402
from validator.region_mask import random_region_mask  # noqa: E402

SIZE = 256


def median_ms(payload: str, truth: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        score_mask(payload, truth)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="Runs per figure (the median is printed).")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    rng = np.random.default_rng(0)
    truth = random_region_mask((SIZE, SIZE), rng)
    payloads = {
        "clean": encode_mask(truth),
        "noisy": encode_mask(np.clip(truth + rng.normal(0, 0.15, truth.shape), 0, 1).astype(np.float32)),
        "oversized (refused)": "A" * (MAX_MASK_BYTES * 2),
    }
    for name, payload in payloads.items():
        print(f"{name:20s} payload {len(payload) / 1024:7.1f} KiB  {median_ms(payload, truth, args.repeats):6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
