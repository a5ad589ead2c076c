"""TALL on CPU, end to end per clip: what the miner does with one `VideoSynapse` payload.

For 16-frame 256² clips from the shared set, encoded as validators send them (`encode_clip`), times
  decode: `decode_clip` (payload → frames), grid: the thumbnail layout, model: the detector's forward pass,
and their sum, one clip at a time (batch 1) and per clip in batches of `--batch`, with `--threads` torch threads.
Pin to one core (`taskset -c 0 ... --threads 1`) for the one-core figure.

    taskset -c 0 python benchmarks/tall_latency.py --threads 1
"""

import argparse
import csv
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from base_miner.registry import build_detector  # noqa: E402
from bitmind.video_codec import decode_clip, encode_clip  # noqa: E402
from bitmind.video_file import read_video  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"


def clips(data: Path, count: int, frames: int) -> list[str]:
    rows = list(csv.DictReader(open(data / "metadata.csv", newline="")))
    payloads = []
    for row in rows[:: max(1, len(rows) // count)][:count]:
        clip = read_video(data / row["path"])
        index = np.minimum(np.arange(frames), len(clip) - 1)  # repeat the last frame of a short clip
        payloads.append(encode_clip(np.stack([np.asarray(Image.fromarray(f).resize((256, 256))) for f in clip[index]])))
    return payloads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", default="tall", help="video detector config")
    parser.add_argument("--data", default=str(DATA), help="folder with metadata.csv and the clips")
    parser.add_argument("--clips", type=int, default=16, help="clips to time")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--batch", type=int, default=8, help="clips per forward pass in the batched run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the clips; the best is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    detector = build_detector(args.detector, device="cpu")
    payloads = clips(Path(args.data), args.clips, args.frames)
    detector.predict_clips([decode_clip(payloads[0])])  # warm-up

    stages = {"decode": [], "grid": [], "model": []}
    for _ in range(args.repeats):
        for payload in payloads:
            t0 = time.perf_counter()
            frames = decode_clip(payload)
            t1 = time.perf_counter()
            grid = detector.grid(frames)
            t2 = time.perf_counter()
            detector.predict([grid])
            t3 = time.perf_counter()
            for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
                stages[name].append(seconds * 1000.0)
    per = {name: float(np.median(values)) for name, values in stages.items()}
    print(f"{args.detector}: {len(payloads)} clips of {args.frames} frames, 256², torch threads {args.threads}")
    print("batch 1, median ms per clip: " + ", ".join(f"{k} {v:.1f}" for k, v in per.items())
          + f", end to end {sum(per.values()):.1f}")  # fmt: skip

    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        for start in range(0, len(payloads), args.batch):
            detector.predict_clips([decode_clip(p) for p in payloads[start : start + args.batch]])
        best = min(best, (time.perf_counter() - started) * 1000.0 / len(payloads))
    print(f"batch {args.batch}, best ms per clip end to end: {best:.1f}")


if __name__ == "__main__":
    main()
