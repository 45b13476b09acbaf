"""Progress bars of the long commands (caption, features, train): a live bar on a terminal, plain lines
in a log.

A tqdm bar redraws itself with carriage returns, which fill a log file (or a CI log) with one long line.
When stderr is not a terminal, the same bar is written as a whole line at most every LOG_INTERVAL
seconds, and once at the end.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between two progress lines in a log


class _Lines:
    """A stream for tqdm that turns each redraw (``\\r`` + the bar) into one plain line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A bar for a log: its statistics (``set_postfix``) wait for the next line instead of forcing one."""

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kw: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kw)


def progress_bar(iterable=None, *, disable: bool = False, file: TextIO | None = None, **kw: Any) -> tqdm:
    """A tqdm bar (arguments as tqdm's) on ``file`` (default: stderr): live on a terminal, else plain lines."""
    stream = sys.stderr if file is None else file
    if disable:
        return tqdm(iterable, disable=True, **kw)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(iterable, file=stream, dynamic_ncols=True, **kw)
    return _LogBar(iterable, file=_Lines(stream), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL,
                ascii=True, ncols=80, **kw)
