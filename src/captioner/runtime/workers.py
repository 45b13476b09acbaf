"""Image-decoding worker processes (`caption` and `features` --workers): how many a command may start, and
that they end with the process that started them.

A DataLoader worker waiting on its queue notices within seconds that its parent is gone, but one busy
decoding (or blocked handing over a batch) does not: after ``kill -9`` of the command it ran on for minutes,
holding files and memory. :func:`worker_init` makes each worker die with its parent.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from typing import Callable

from captioner.checks import is_int

MAX_WORKERS = 64
"""More decoding processes than this only add memory: each holds a copy of the images in flight."""

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def check_workers(n) -> int:
    """``n`` image-decoding processes, checked: a whole number from 0 (decode in this process) to MAX_WORKERS."""
    if not is_int(n) or not 0 <= n <= MAX_WORKERS:
        raise ValueError(f"workers {n!r}: must be from 0 to {MAX_WORKERS} (image decoding processes; 0: decode "
                         "in this process)")
    return n


def worker_init() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` (picklable) under which each worker ends when this process does."""
    return functools.partial(_die_with_parent, os.getpid())


def _die_with_parent(parent: int, worker_id: int) -> None:
    """In a worker: ask Linux to SIGKILL it when its parent ends (prctl PR_SET_PDEATHSIG); elsewhere, or
    where that call fails, a thread that watches the parent id. A parent already gone ends it at once."""
    if not (sys.platform.startswith("linux") and _set_parent_death_signal()):
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="captioner-parent-watch").start()
    if os.getppid() != parent:  # the parent died before the signal was asked for: nobody would send it
        os._exit(1)


def _set_parent_death_signal() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)
