"""`bitmind-detect`: score image files with a detector config, the way a miner would score challenges.

Every file goes through the miner's decoder (`bitmind.image_codec`, same size and format limits), so a file the
CLI accepts is one a miner would accept. A bad file gets a per-file error and a non-zero exit status without
stopping the others.
"""

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from bitmind.image_codec import DecodeLimits, ImageDecodeError, decode_bytes

__all__ = ["build_parser", "load_image", "main"]

log = logging.getLogger("bitmind-detect")

EXIT_OK, EXIT_FILE_ERRORS, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitmind-detect",
        description="Print the probability that each image is AI-generated, with CAMO's route and expert outputs.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WEBP, BMP, GIF, TIFF)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {path, probability, route, experts}")
    parser.add_argument(
        "--detector",
        default="camo",
        metavar="CONFIG",
        help="detector config: a YAML path or a packaged config name (camo, npr, generalist, ucf; default camo)",
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default auto: CUDA if present)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per detector call (default 16)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log detector loading and gate decisions")
    return parser


def load_image(path: Path, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Read and decode one file with the miner's limits; raises `ImageDecodeError` with the reason."""
    try:
        if not path.is_file():
            raise ImageDecodeError("no such file" if not path.exists() else "not a regular file")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageDecodeError(f"file has {size} bytes, more than the limit of {limits.max_bytes}")
        raw = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read: {exc.strerror or exc}") from exc
    return decode_bytes(raw, limits)


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _score_batch(detector, paths: list[str]) -> list[dict[str, Any]]:
    """One result per path, in order: a prediction, or the error that stopped this file."""
    results: list[dict[str, Any]] = [{"path": path} for path in paths]
    loaded: list[tuple[dict[str, Any], Image.Image]] = []
    for result in results:
        try:
            loaded.append((result, load_image(Path(result["path"]))))
        except ImageDecodeError as exc:
            result["error"] = str(exc)
    if loaded:
        try:
            predictions = detector.predict_detailed([image for _, image in loaded])
        except Exception as exc:  # noqa: BLE001 - a detector failure costs this batch, not the whole run
            for result, _ in loaded:
                result["error"] = f"detector failed: {type(exc).__name__}: {exc}"
        else:
            for (result, _), prediction in zip(loaded, predictions):
                result.update(
                    probability=float(prediction.probability),
                    route=prediction.route,
                    experts={name: float(value) for name, value in prediction.experts.items()},
                )
    return results


def _format_line(result: dict[str, Any]) -> str:
    line = f"{result['path']}\t{result['probability']:.4f}"
    if result["route"]:
        line += f"\troute={result['route']}"
    if result["experts"]:
        line += "\t" + " ".join(f"{name}={value:.4f}" for name, value in result["experts"].items())
    return line


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns 0, 1 when any file failed, 2 on a usage or detector-config error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.batch_size < 1:
        print(f"bitmind-detect: error: --batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return EXIT_USAGE

    from base_miner.registry import ConfigError, build_detector

    try:
        detector = build_detector(args.detector, device=args.device)
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        print(f"bitmind-detect: error: cannot build detector {args.detector!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    results: list[dict[str, Any]] = []
    for paths in _batches(args.images, args.batch_size):
        for result in _score_batch(detector, paths):
            results.append(result)
            if "error" in result:
                print(f"bitmind-detect: {result['path']}: {result['error']}", file=sys.stderr)
            elif not args.json:
                print(_format_line(result), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return EXIT_FILE_ERRORS if any("error" in result for result in results) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
