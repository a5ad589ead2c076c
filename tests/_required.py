"""What a test needs that a developer machine may lack (the shared data sets, a tool): CI (CI=true) must run
everything, so there its absence fails the test; elsewhere the test is skipped with how to get it."""

import os
from pathlib import Path
from typing import NoReturn

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(message: str) -> NoReturn:
    """Fail under CI, skip elsewhere."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def shared_data(relative: str) -> Path:
    """`../shared/data/<relative>`, the project's shared test data; missing: fail under CI, skip elsewhere."""
    path = SHARED_DATA / relative
    if not path.exists():
        missing(f"shared test data missing: {path} (the project's ../shared/data checkout)")
    return path
