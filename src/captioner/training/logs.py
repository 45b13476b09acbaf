"""The run's logs in ``out_dir``: metrics.jsonl (one line per epoch) and curves.png (loss and validation
score per epoch), both rewritten whole from the checkpointed history."""

from __future__ import annotations

import json
from pathlib import Path

from captioner.data.text import write_text_atomic
from captioner.training.config import TrainError


def write_logs(history: list[dict], out: Path, metric: str) -> None:
    """metrics.jsonl and curves.png, rewritten whole from the checkpointed history (no duplicates on resume)."""
    try:
        write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        if history:
            plot_curves(history, out / "curves.png", metric)
    except OSError as e:  # full disk: the checkpoint holds the history, --resume writes the logs again
        raise TrainError(f"{out}: cannot write metrics.jsonl / curves.png ({e.strerror or e}); the checkpoint "
                         "holds them: free some space, then --resume writes them again") from None


def plot_curves(history: list[dict], path: Path, metric: str) -> None:
    """curves.png: the training loss (cross-entropy, SCST's sampled reward) and the validation score per epoch."""
    import matplotlib  # optional and slow to import: only when a run has an epoch to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(ep, [h["train_loss"] for h in history], marker="o", label="train (total)")
    if all("train_ce" in h for h in history):
        ax[0].plot(ep, [h["train_ce"] for h in history], marker=".", label="train cross-entropy")
    if all("train_reward" in h for h in history):  # SCST: the mean CIDEr-D of the sampled captions
        ax[0].plot(ep, [h["train_reward"] for h in history], marker=".", label="sampled reward (CIDEr-D)")
    ax[0].set_xlabel("epoch"), ax[0].set_title("loss"), ax[0].legend()
    ax[1].plot(ep, [h["val"].get(metric, float("nan")) for h in history], marker="o", color="C2")
    ax[1].set_xlabel("epoch"), ax[1].set_title(f"validation {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
