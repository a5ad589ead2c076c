"""`bitmind-export`: package a detector for subnet 34's model-submission benchmark (gasbench), and check a package.

    bitmind-export gas --detector generalist --out export/generalist --zip
    bitmind-export check export/generalist.zip

`gas` writes model_config.yaml, model.py and model.safetensors (see `base_miner/export/writer.py`); `check` runs
the benchmark's documented checks offline (see `base_miner/export/check.py`). Exit status: 0 done / passed,
1 the package fails a check, 2 bad input.
"""

import argparse
import logging
import sys
from collections.abc import Sequence

from base_miner.export.check import PackageError, check_package
from base_miner.export.writer import DEFAULT_RESIZE, export_gas
from base_miner.registry import ConfigError
from bitmind.arg_types import positive
from bitmind import __version__

__all__ = ["build_parser", "main"]

log = logging.getLogger("bitmind-export")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitmind-export", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gas = commands.add_parser("gas", help="write a detector as a benchmark package",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    gas.add_argument("--detector", required=True, metavar="CONFIG", help="YAML path or packaged config name (generalist, npr, probe, tiny_cnn, ucf, camo, ...)")
    gas.add_argument("--out", required=True, metavar="DIR", help="package folder to write (created if missing; the three package files are replaced)")
    gas.add_argument("--zip", action="store_true", help="also write DIR.zip with the three files at its root, ready to upload")
    gas.add_argument("--resize", type=positive(int), default=DEFAULT_RESIZE,
                     help="side of the square the benchmark resizes every image to (preprocessing.resize); each expert then crops or resizes from it as when served")  # fmt: skip
    gas.add_argument("--name", default=None, help="package name in model_config.yaml (default bitmind-<detector name>)")
    gas.add_argument("--version", default=__version__, help="package version in model_config.yaml")
    check = commands.add_parser("check", help="check a package folder or zip the way the benchmark does",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    check.add_argument("package", metavar="PATH", help="package folder or zip")
    check.add_argument("--batch-size", type=positive(int), default=4, help="images in the uint8 test batch")
    check.add_argument("--timeout", type=positive(int), default=300, help="seconds allowed for the load and the forward passes")
    return parser


def _gas(args: argparse.Namespace) -> int:
    result = export_gas(args.detector, args.out, resize=args.resize, make_zip=args.zip, name=args.name, version=args.version)
    print(f"wrote {result.folder}" + (f" and {result.zip_path}" if result.zip_path else ""))
    for item in result.dropped:
        print(f"dropped: {item}")
    print(f"next: bitmind-export check {result.zip_path or result.folder}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    report = check_package(args.package, batch_size=args.batch_size, timeout=args.timeout)
    for problem in report.problems:
        print(f"FAIL: {problem}")
    if not report.ok:
        print(f"{args.package}: {len(report.problems)} problem(s); the benchmark would refuse this package")
        return EXIT_FAILED
    info = report.info
    print(
        f"PASS: {args.package}: {info.name}, input {info.resize[0]}x{info.resize[1]}, load {report.load_seconds:.2f} s, "
        f"{report.ms_per_image:.1f} ms/image at batch {report.batch_size} ({report.network})"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _gas(args) if args.command == "gas" else _check(args)
    except (ConfigError, PackageError, OSError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
