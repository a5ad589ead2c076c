"""One conversion to strict JSON for everything this project writes as JSON (heartbeats, cache sidecars, image
metadata): JSON has no NaN or infinity, and numpy scalars, arrays and paths are not JSON types.
"""

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["json_safe"]


def json_safe(value: Any, *, strict: bool = True) -> Any:
    """A copy of `value` that `json.dumps(..., allow_nan=False)` accepts.

    Non-finite floats become None; numpy scalars and arrays become Python numbers and lists; paths become strings;
    tuples become lists; mapping keys become strings. Anything else raises TypeError naming its type, or becomes
    its `str()` with `strict=False` (for status files, where showing something beats failing).
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): json_safe(item, strict=strict) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(item, strict=strict) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if strict:
        raise TypeError(f"a value of type {type(value).__name__} is not JSON-serialisable")
    return str(value)
