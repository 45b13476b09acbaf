"""A watchdog for tests of code that must never block: a hang becomes a test failure."""

from __future__ import annotations

import contextlib
import signal


class Hang(AssertionError):
    pass


@contextlib.contextmanager
def hang_guard(seconds: int = 60):
    """Fail with :class:`Hang` if the block is still running after ``seconds`` (not a speed check:
    the calls guarded take milliseconds)."""

    def fire(*_):
        raise Hang(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
