"""Linear learning-rate warm-up (``optim.warmup``): the first N optimizer steps of a run scale the lr.

Step s (0-based, counted over the whole run: ``state["step"]``, saved in last.pt, so ``--resume`` goes on
along the ramp, and the same on every torchrun rank) trains at ``lr * min(1, (s + 1) / N)``: lr/N at the
first step, the full rate from step N-1 on. The factor multiplies whatever the schedule sets (the plateau
schedule's current lr, or the cosine's), and only for that one step: the schedule's own lr stays in the
optimizer, so a plateau decay acts on it, and last.pt holds it.

Why: Adam's first updates, before its second-moment estimates have settled, are large, and a Transformer's
attention and LayerNorm'd residual stream can be pushed by them into a state it learns slowly from
(Vaswani et al. 2017 warm up for 4000 steps; Liu et al. 2020, "On the Variance of the Adaptive Learning
Rate and Beyond", trace it to Adam's variance). The default when a config leaves ``optim.warmup`` unset is
the architecture's ``default_warmup`` (:func:`default_warmup`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from captioner.models import get_architecture


def default_warmup(arch: str, init_from: str = "") -> int:
    """The warm-up of a config that leaves ``optim.warmup`` unset: the architecture's ``default_warmup``
    steps when training starts from random weights, 0 from ``init_from`` (a trained model: a later stage,
    fine-tuning, SCST, whose Adam starts afresh but whose weights are past the first steps' risk)."""
    if init_from:
        return 0
    return int(getattr(get_architecture(arch)[0], "default_warmup", 0))


def warmup_factor(step: int, warmup: int | None) -> float:
    """The lr factor of step ``step`` (0-based): ``min(1, (step + 1) / warmup)``; 1 when warmup is 0 or unset."""
    if not warmup or step + 1 >= warmup:
        return 1.0
    return (step + 1) / warmup


@contextmanager
def warmed_up(opt: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Within the block (one optimizer step), every param group's lr times ``factor``; the schedule's lr
    is back in place afterwards."""
    if factor >= 1.0:
        yield
        return
    scheduled = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = g["lr"] * factor
    try:
        yield
    finally:
        for g, lr in zip(opt.param_groups, scheduled):
            g["lr"] = lr
