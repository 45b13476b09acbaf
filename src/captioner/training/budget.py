"""The time budget of a run (``optim.max_minutes``), decided by rank 0's clock for every rank."""

from __future__ import annotations

import time

from captioner.runtime.distributed import Group


class Budget:
    """``optim.max_minutes``: the epoch in progress is cut short in time for its validation (a tenth of
    the budget is kept for it, then 1.2 x the longest validation so far). Rank 0's clock decides for
    every rank, so all stop at the same step and follow the same cosine. On --resume the clock goes on
    from the checkpoint's ``spent`` seconds."""

    def __init__(self, minutes: float, group: Group, *, spent: float = 0.0, longest_val: float = 0.0):
        self.seconds = minutes * 60.0  # 0: no budget
        self.longest_val = longest_val
        self.group = group
        self.t_start = time.perf_counter() - spent
        self.out = False  # the time is up

    @property
    def reserve(self) -> float:
        return max(0.1 * self.seconds, 1.2 * self.longest_val)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def check(self) -> float:
        """Before each step: sets ``out`` when the time is up; returns the fraction of the training time
        used (the cosine schedule's progress; 0 without a budget)."""
        if not self.seconds:
            return 0.0
        elapsed, left = self.elapsed(), self.seconds - self.reserve
        out, used = self.group.broadcast_numbers([float(elapsed > left), elapsed / max(left, 1e-9)])
        self.out = bool(out)
        return used

    def validated(self, seconds: float) -> None:
        self.longest_val = max(self.longest_val, seconds)

    def to_state(self) -> dict:
        return {"seconds": self.elapsed(), "longest_val": self.longest_val}
