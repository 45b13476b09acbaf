"""This process among torchrun's ranks: the process group on the run's device, each rank's random stream,
rank 0 alone warning, and the check that every rank starts from the same point."""

from __future__ import annotations

import contextlib
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from captioner.runtime.devices import DeviceError, resolve_device
from captioner.runtime.distributed import Group, backend_for, env_world, process_group
from captioner.training.config import TrainConfig, TrainError


def process_group_for(cfg: TrainConfig):
    """This process's place among torchrun's ranks (one of one without torchrun), on cfg.device's backend."""
    return process_group(backend_for(_this_ranks_device(cfg.device)))


def _this_ranks_device(name: str) -> torch.device | None:
    """The device this process trains on, to choose the process group's backend (None for a wrong name:
    setup reports it). Under torchrun a GPU rank makes its GPU the current one, as NCCL needs."""
    try:
        device = resolve_device(name)
    except (DeviceError, ValueError):
        return None
    if device.type == "cuda" and env_world()[1] > 1:
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def warnings_on_rank0_only(group: Group):
    """Ranks other than 0 print nothing but errors (their warnings would repeat rank 0's)."""
    with warnings.catch_warnings():
        if group.rank:
            warnings.simplefilter("ignore")
        yield


def seed_rank(seed: int, rank: int) -> None:
    """A random stream of its own for a rank other than 0 (rank 0 keeps the single-process one)."""
    s = np.random.SeedSequence([seed, rank]).generate_state(2)
    torch.manual_seed(int(s[0]))
    np.random.seed(int(s[1]))
    random.seed(int(s[1]))


def same_start(where: list[tuple[int, int]], out: Path) -> None:
    """Rank 0, before the first epoch: the (epoch, step) each rank would start from must be the same."""
    if len(set(where)) > 1:
        raise TrainError(f"the ranks would start from different points ((epoch, step) per rank: {where}): they do "
                         f"not all see the same {out}/last.pt. Put out_dir on a filesystem every node sees")
