"""`bitmind-detect`: score image and video files with detector configs, the way a miner would score challenges.

Every image goes through the miner's decoder (`bitmind.image_codec`, same size and format limits), so a file the
CLI accepts is one a miner would accept. Video files (by suffix) are read with `bitmind.video_file` (PyAV, with
limits) and scored as one clip each by the video detector (`--video-detector`, TALL by default), after the images.
A bad file gets a per-file error and a non-zero exit status without stopping the others. A detector is built only
when some file needs it.
"""

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from base_miner.mask_pictures import write_mask_pictures
from bitmind.image_codec import DecodeLimits, ImageDecodeError, decode_bytes
from bitmind.video_file import read_video

__all__ = ["build_parser", "load_image", "main"]

log = logging.getLogger("bitmind-detect")

EXIT_OK, EXIT_FILE_ERRORS, EXIT_USAGE = 0, 1, 2
# Files scored as clips; everything else (GIF included) is read as an image.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitmind-detect",
        description="Print the probability that each image or video is AI-generated, with CAMO's route and expert "
        "outputs.",
    )
    parser.add_argument(
        "images",
        nargs="+",
        metavar="FILE",
        help="image files (JPEG, PNG, WEBP, BMP, GIF, TIFF) and video files (MP4, M4V, MOV, WEBM, MKV, AVI)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of {path, probability, route, experts}")
    parser.add_argument(
        "--detector",
        default="camo",
        metavar="CONFIG",
        help="detector config: a YAML path or a packaged config name (camo, npr, generalist, ucf; default camo)",
    )
    parser.add_argument(
        "--video-detector",
        default="tall",
        metavar="CONFIG",
        help="detector config for video files: a YAML path or a packaged config name (default tall)",
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default auto: CUDA if present)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per detector call (default 16)")
    parser.add_argument(
        "--mask",
        default=None,
        metavar="OUT.png",
        help="write each image's generated-pixel map (grayscale PNG) and a red overlay (OUT_overlay.png); with "
        "several images, OUT-<n>.png for the n-th (from 1). Needs a detector that produces maps (segmenter, or CAMO "
        "with a segmenter expert)",
    )
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


def mask_path(template: str, index: int, count: int) -> Path:
    """Where the map of the `index`-th (0-based) of `count` images goes: the template itself for one image."""
    path = Path(template)
    return path if count == 1 else path.with_name(f"{path.stem}-{index + 1}{path.suffix or '.png'}")


def _write_mask(result: dict[str, Any], image: Image.Image, prediction, target: Path) -> None:
    if prediction.mask is None:
        result["error"] = "the detector produced no generated-pixel map (use a segmenter or a CAMO with one)"
        return
    try:
        written = write_mask_pictures(image, prediction.mask, target)
    except (OSError, ValueError) as exc:
        result["error"] = f"cannot write the mask pictures: {exc}"
        return
    result.update(mask=str(written[0]), overlay=str(written[1]))


def _score_batch(detector, paths: list[str], masks: list[Path] | None = None) -> list[dict[str, Any]]:
    """One result per path, in order: a prediction, or the error that stopped this file; with `masks` (one target
    per path) each image's map and overlay are written there."""
    results: list[dict[str, Any]] = [{"path": path} for path in paths]
    loaded: list[tuple[dict[str, Any], Image.Image, Path | None]] = []
    for result, target in zip(results, masks or [None] * len(paths)):
        try:
            loaded.append((result, load_image(Path(result["path"])), target))
        except ImageDecodeError as exc:
            result["error"] = str(exc)
    if loaded:
        try:
            predictions = detector.predict_detailed([image for _, image, _ in loaded])
        except Exception as exc:  # noqa: BLE001 - a detector failure costs this batch, not the whole run
            for result, _, _ in loaded:
                result["error"] = f"detector failed: {type(exc).__name__}: {exc}"
        else:
            for (result, image, target), prediction in zip(loaded, predictions):
                result.update(
                    probability=float(prediction.probability),
                    route=prediction.route,
                    experts={name: float(value) for name, value in prediction.experts.items()},
                )
                if target is not None:
                    _write_mask(result, image, prediction, target)
    return results


def is_video(path: str) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _score_videos(detector, paths: list[str]) -> list[dict[str, Any]]:
    """One result per video file, in order; clips are scored one by one (a clip is already many frames)."""
    results: list[dict[str, Any]] = []
    for path in paths:
        result: dict[str, Any] = {"path": path}
        results.append(result)
        try:
            [prediction] = detector.predict_clips([read_video(Path(path))])
        except ImageDecodeError as exc:  # VideoDecodeError is one
            result["error"] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a detector failure costs this file, not the whole run
            result["error"] = f"detector failed: {type(exc).__name__}: {exc}"
            continue
        result.update(probability=float(prediction.probability), route=prediction.route,
                      experts={name: float(value) for name, value in prediction.experts.items()})  # fmt: skip
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

    images = [path for path in args.images if not is_video(path)]
    videos = [path for path in args.images if is_video(path)]
    built = []
    for config, needed in ((args.detector, images), (args.video_detector, videos)):
        try:
            built.append(build_detector(config, device=args.device) if needed else None)
        except (ConfigError, OSError, ValueError, RuntimeError) as exc:
            print(f"bitmind-detect: error: cannot build detector {config!r}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    detector, video_detector = built
    if videos and not hasattr(video_detector, "predict_clips"):
        print(f"bitmind-detect: error: {args.video_detector!r} is not a video detector (try tall)", file=sys.stderr)
        return EXIT_USAGE

    def scored():
        targets = [mask_path(args.mask, i, len(images)) for i in range(len(images))] if args.mask else None
        for start in range(0, len(images), args.batch_size):
            paths = images[start : start + args.batch_size]
            chunk_targets = targets[start : start + args.batch_size] if targets else None
            yield from _score_batch(detector, paths, chunk_targets)
        if videos:
            yield from _score_videos(video_detector, videos)

    results: list[dict[str, Any]] = []
    for result in scored():
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
