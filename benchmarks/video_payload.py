"""Clip payload size and decode time: our `bmv1` AV1 format against the reference's JPEG + zlib + base85 frames.

For each shared clip (`../shared/data/video`), the first `--frames` consecutive frames are resized to `--size`²
(what a validator sends) and encoded both ways: the reference format reimplemented from its description (each
frame a PIL JPEG at `--quality`, bytes concatenated, zlib, base85) and `bitmind.video_codec.encode_clip` at the
same quality. Prints per-format bytes, PSNR against the original frames (fidelity at that quality) and the best
of `--repeats` decode times on one thread (pin the process to one core with `taskset -c 0` for a one-core figure),
then the totals: size ratio (reference / ours, sum over clips, and median per clip), PSNR difference, decode ms.
With `--match-psnr`, also the ratio when each clip is encoded at the lowest of our quality steps whose PSNR is at
least the reference's (equal fidelity per clip, however the quality scales differ).

    taskset -c 0 python benchmarks/video_payload.py --clips 20
"""

import argparse
import base64
import csv
import io
import os
import statistics
import time
import zlib
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bitmind.video_codec import decode_clip, encode_clip  # noqa: E402
from bitmind.video_file import read_video  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"


def reference_encode(frames: np.ndarray, quality: int) -> str:
    """The reference wire format as described: JPEG frames, concatenated, zlib-compressed, base85-encoded."""
    parts = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        parts.append(buffer.getvalue())
    return base64.b85encode(zlib.compress(b"".join(parts))).decode("ascii")


def reference_decode(payload: str) -> np.ndarray:
    """Inverse of `reference_encode`: split the JPEG stream at end-of-image markers and decode each frame."""
    raw = zlib.decompress(base64.b85decode(payload))
    frames = [chunk + b"\xff\xd9" for chunk in raw.split(b"\xff\xd9") if chunk]
    return np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in frames])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12)))


def matched_payload(frames: np.ndarray, target_psnr: float) -> str:
    """Our smallest payload, over quality steps of 5, whose PSNR is at least `target_psnr` (quality 100 if none)."""
    best = encode_clip(frames, 100)
    for quality in range(95, 0, -5):
        payload = encode_clip(frames, quality)
        if psnr(frames, decode_clip(payload)) < target_psnr:
            break
        best = payload
    return best


def best_ms(fn, payload: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(payload)
        times.append(time.perf_counter() - started)
    return min(times) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA), help="folder with metadata.csv and the clips")
    parser.add_argument("--clips", type=int, default=20, help="clips to measure (every n-th of the metadata)")
    parser.add_argument("--frames", type=int, default=16, help="consecutive frames per clip")
    parser.add_argument("--size", type=int, default=256, help="frames are resized to size²")
    parser.add_argument("--quality", type=int, default=75, help="JPEG quality of the reference, quality of ours")
    parser.add_argument("--repeats", type=int, default=5, help="decode repeats; the best is reported")
    parser.add_argument("--match-psnr", action="store_true", help="also measure at equal PSNR per clip")
    args = parser.parse_args()

    rows = list(csv.DictReader(open(Path(args.data) / "metadata.csv", newline="")))
    step = max(1, len(rows) // args.clips)
    results = []
    print(f"{'clip':40s} {'frames':>6s} {'ref B':>8s} {'ours B':>8s} {'ratio':>6s} {'dPSNR':>6s} {'ref ms':>7s} {'ours ms':>7s}")
    for row in rows[::step][: args.clips]:
        clip = read_video(Path(args.data) / row["path"])[: args.frames]
        frames = np.stack([np.asarray(Image.fromarray(f).resize((args.size, args.size), Image.Resampling.BICUBIC)) for f in clip])
        ref, ours = reference_encode(frames, args.quality), encode_clip(frames, args.quality)
        ref_psnr, our_psnr = psnr(frames, reference_decode(ref)), psnr(frames, decode_clip(ours))
        ref_ms, our_ms = best_ms(reference_decode, ref, args.repeats), best_ms(decode_clip, ours, args.repeats)
        matched = len(matched_payload(frames, ref_psnr)) if args.match_psnr else 0
        results.append((len(frames), len(ref), len(ours), our_psnr - ref_psnr, ref_ms, our_ms, matched))
        print(f"{Path(row['path']).name[:40]:40s} {len(frames):6d} {len(ref):8d} {len(ours):8d} "
              f"{len(ref) / len(ours):6.2f} {our_psnr - ref_psnr:+6.2f} {ref_ms:7.1f} {our_ms:7.1f}")  # fmt: skip
    n, ref_b, our_b, d_psnr, ref_ms, our_ms, matched = (np.array(column) for column in zip(*results))
    full = n == args.frames
    print(f"\n{len(results)} clips, {args.size}², quality {args.quality}")
    print(f"size: reference {ref_b.sum() / 1e6:.2f} MB, ours {our_b.sum() / 1e6:.2f} MB: "
          f"{ref_b.sum() / our_b.sum():.2f}x smaller (median per clip {statistics.median(ref_b / our_b):.2f}x)")  # fmt: skip
    print(f"fidelity: PSNR ours - reference: mean {d_psnr.mean():+.2f} dB, median {np.median(d_psnr):+.2f} dB, "
          f"ours >= reference on {np.mean(d_psnr >= 0):.0%} of clips")  # fmt: skip
    if args.match_psnr:
        print(f"equal PSNR per clip: ours {matched.sum() / 1e6:.2f} MB: {ref_b.sum() / matched.sum():.2f}x smaller "
              f"(median per clip {statistics.median(ref_b / matched):.2f}x)")  # fmt: skip
    if full.any():
        print(f"decode of {args.frames}-frame clips (median over {int(full.sum())}): reference "
              f"{np.median(ref_ms[full]):.1f} ms, ours {np.median(our_ms[full]):.1f} ms (max {our_ms[full].max():.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
