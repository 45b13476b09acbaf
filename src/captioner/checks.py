"""The checks every entry point shares: what a whole number, a number and a JSON-safe value are.

Data is validated where it enters (corpus files, model directories, feature stores, configs,
command-line arguments, HTTP options) with these, so that "3" is never silently 3, True never 1, and
NaN never a number.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 200
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 12
_SHOWN.maxlevel = 3


def is_int(v: Any) -> bool:
    """A whole number, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def shown(v: Any) -> str:
    """``repr(v)`` for an error message, shortened (a string to 200 characters, a list to 12 items): a
    message quotes a value, never 50 MB of it."""
    return _SHOWN.repr(v)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
