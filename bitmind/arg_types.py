"""argparse types shared by the command lines: a bad number is the parser's error (exit 2, the flag named)."""

import argparse
from collections.abc import Callable

__all__ = ["positive"]


def positive(kind: type) -> Callable[[str], object]:
    """A number of `kind` above 0."""

    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse
