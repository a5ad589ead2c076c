"""`python -m bitmind.monitoring check FILE --max-age S`: is a neuron's heartbeat fresh (for cron or a health probe)?"""

import argparse
import sys

from bitmind.arg_types import positive
from bitmind.monitoring.heartbeat import check_heartbeat
from bitmind.monitoring.watchdog import DEFAULT_WATCHDOG_TIMEOUT_S


def main(argv: list[str] | None = None) -> int:
    """`python -m bitmind.monitoring check FILE --max-age S`: exit 0 when the heartbeat is fresh, 1 otherwise."""
    parser = argparse.ArgumentParser(description="Check a neuron's heartbeat file (for cron or a health probe).")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="Exit 1 when the heartbeat file is missing, invalid or stale.")
    check.add_argument("path", help="Heartbeat file, e.g. ~/.bitmind/validator/heartbeat.json")
    check.add_argument("--max-age", type=positive(float), default=DEFAULT_WATCHDOG_TIMEOUT_S, help="Seconds.")
    args = parser.parse_args(argv)
    ok, message = check_heartbeat(args.path, args.max_age)
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
