"""The checks every entry point shares: what a whole number, a number and a JSON-safe value are.

Data is validated where it enters (corpus files, model directories, feature stores, configs,
command-line arguments, HTTP options) with these, so that "3" is never silently 3, True never 1, and
NaN never a number.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(v: Any) -> bool:
    """A whole number, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
