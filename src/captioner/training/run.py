"""What a training run holds between epochs (:class:`Run`, made by :func:`captioner.training.loop.setup`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from captioner.data.captions import CaptionData
from captioner.data.text import Vocab
from captioner.runtime.distributed import Group
from captioner.training.budget import Budget
from captioner.training.config import TrainConfig


@dataclass
class Run:
    """What a training run holds between epochs (made by ``loop.setup``)."""

    cfg: TrainConfig
    group: Group  # this rank among the torchrun processes (rank 0 of 1 without torchrun)
    device: torch.device
    out: Path
    vocab: Vocab
    train_data: CaptionData
    val_data: CaptionData
    decoder: torch.nn.Module  # the network itself: validated, checkpointed, saved
    model: torch.nn.Module  # BatchLoss around the decoder; under torchrun wrapped in DistributedDataParallel
    opt: torch.optim.Optimizer
    sched: Any  # ReduceLROnPlateau (used by schedule=plateau)
    state: dict  # epoch, step, best, best_epoch, bad_epochs, history: what last.pt records besides the weights
    info: dict  # what best/ records about the training
    resumed: bool = False
    budget: Budget | None = None  # made by start()
    ema: Any = None  # optim.ema > 0: torch.optim.swa_utils.AveragedModel of the decoder (validated, kept as best/)
    steps_run: int = 0  # steps in this process (stop_after_steps)
    lock: Any = None  # rank 0: the OutDirLock held on out_dir while the run trains

    @property
    def scst(self) -> bool:
        return self.cfg.objective == "scst"

    @property
    def kept(self) -> torch.nn.Module:
        """The weights that are validated and saved as best/: the moving average with optim.ema, else the
        decoder's own."""
        return self.ema.module if self.ema is not None else self.decoder

    @property
    def stopped_early(self) -> bool:
        return bool(self.cfg.optim.early_stop and self.state["bad_epochs"] >= self.cfg.optim.early_stop)

    def say(self, *args, **kw) -> None:
        """print, on rank 0 only."""
        if self.group.rank == 0:
            print(*args, **kw, flush=True)
