"""Checkpoints: last.pt (everything --resume needs, written atomically) and best/ (a model directory).

last.pt holds the weights, the optimizer, the scheduler, the moving average, every rank's random state
(torch, numpy, Python), the run's state and history, its config and its vocabulary. --resume refuses a
checkpoint written with another config (except the settings a resume may change) or another vocabulary.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from captioner.data.text import Vocab
from captioner.files import WEIGHTS_BYTES, check_regular, open_regular
from captioner.inference.modeldir import save_model_dir
from captioner.runtime.distributed import Group
from captioner.training.config import OptimConfig, TrainConfig, TrainError
from captioner.training.logs import write_logs
from captioner.training.run import Run
from captioner.training.tuned import TunedDecoder, restore_tuned

RESUMABLE_CHANGES = {"optim.epochs", "optim.max_minutes", "progress", "threads", "device"}


def save_checkpoint(run: Run, best_scores: dict | None) -> None:
    """Rank 0 writes best/ (when ``best_scores``: this epoch is the best), last.pt and the logs; a failed
    write stops every rank. last.pt holds every rank's random state, for an exact --resume."""
    rng = run.group.gather(_rng_state())
    if run.group.world > 1 and len(set(run.group.gather(_weights_checksum(run.decoder)))) > 1:  # a bug
        raise RuntimeError(f"the ranks' weights differ after epoch {run.state['epoch']}: they trained apart")

    def write() -> None:
        if best_scores is not None:
            save_best(run, best_scores, run.state["epoch"])
        _atomic_save({"model": run.decoder.state_dict(), "optimizer": run.opt.state_dict(),
                       **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
                       "scheduler": run.sched.state_dict(), "rng": rng[0],
                       **({"rng_ranks": rng} if len(rng) > 1 else {}),
                       "state": json.dumps(run.state), "config": json.dumps(asdict(run.cfg)),
                       "vocab": json.dumps(run.vocab.itos)}, run.out / "last.pt")
        write_logs(run.state["history"], run.out, run.cfg.val_metric)

    run.group.agree(write if run.group.rank == 0 else lambda: None)


def save_best(run: Run, scores: dict, epoch: int) -> None:
    """best/: a model directory of the kept weights, with what the run records and the validation scores (and the
    encoder's tuned units, on a trunk store)."""
    kept, info, weights = run.kept, run.info, None
    if isinstance(kept, TunedDecoder):
        info = {**info, "encoder": kept.encoder_record(info["encoder"])}
        kept, weights = kept.inner, kept.encoder_weights()
    save_model_dir(run.out / "best", kept, run.vocab, {**info, "metrics": {"val": {
        "split": run.cfg.data.val_split, "beam": run.cfg.val_beam, "epoch": epoch, **scores}}},
        encoder_weights=weights)


def restore_best(run: Run) -> bool:
    """Back to best/'s weights: rank 0 reads them, every rank gets them. False when there is no best/."""
    best = run.out / "best"
    found = run.group.on_rank0(lambda: best.is_dir() and _restore_weights(run.decoder, best))
    if found:
        run.group.broadcast_tensors(run.decoder.state_dict().values())
        if run.ema is not None:  # the average starts again from the best weights
            run.ema.module.load_state_dict(run.decoder.state_dict())
    return found


def _restore_weights(decoder, model_dir: Path) -> bool:
    check_regular(model_dir / "model.safetensors", "best/'s weights file", WEIGHTS_BYTES)
    weights = load_file(str(model_dir / "model.safetensors"))
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    if isinstance(decoder, TunedDecoder):
        restore_tuned(decoder, model_dir, state)
    else:
        decoder.load_state_dict(state)
    return True


def load_checkpoint(ckpt: Path, cfg: TrainConfig, group: Group, decoder, opt, sched, vocab: Vocab,
                    vocab_path: str, ema=None) -> dict:
    """--resume: weights, optimizer, scheduler and this rank's random state from last.pt; returns the state."""
    with open_regular(ckpt, "the checkpoint", WEIGHTS_BYTES) as f:  # not a FIFO: that would block for ever
        c = torch.load(f, map_location="cpu", weights_only=True)
    # a setting added since the checkpoint was written counts as its default; optim.warmup as 0 (there was no
    # warm-up before it): its default (None, the architecture's) is resolved to a number in the config compared
    old = _over(asdict(TrainConfig(optim=OptimConfig(warmup=0))), json.loads(c["config"])) if "config" in c else None
    changed = config_changes(old, asdict(cfg)) if old is not None else []
    if changed:
        raise TrainError(f"--resume: {cfg.out_dir} was trained with another config ({'; '.join(changed[:5])}); "
                         "resume with the same settings (only optim.epochs, progress, threads and device may change)")
    _check_resume_vocab(c, decoder, vocab, vocab_path, ckpt)
    decoder.load_state_dict(c["model"])
    opt.load_state_dict(c["optimizer"])
    sched.load_state_dict(c["scheduler"])
    if ema is not None:
        ema.load_state_dict(c["ema"])
    states = c.get("rng_ranks") or [c["rng"]]
    if group.rank < len(states):  # a rank the run did not have before keeps its own seed
        _set_rng_state(states[group.rank])
    return json.loads(c["state"])


def _check_resume_vocab(c: dict, decoder, vocab: Vocab, vocab_path: str, ckpt: Path) -> None:
    """--resume with the same config but a vocabulary file that changed since (prepare rerun)."""
    if "vocab" in c:
        old = json.loads(c["vocab"])
        if old == vocab.itos:
            return
        detail = f"{len(old)} words then, {len(vocab)} now" if len(old) != len(vocab) else "same size, other words"
    else:  # a checkpoint from before the vocabulary was recorded: compare the weight shapes
        mine = decoder.state_dict()
        wrong = [k for k, v in c["model"].items() if k in mine and tuple(v.shape) != tuple(mine[k].shape)]
        if not wrong:
            return
        detail = f"the weights {', '.join(wrong[:2])} have other shapes"
    raise TrainError(f"--resume: {vocab_path} changed since {ckpt} was written ({detail}); a run cannot continue with "
                     "another vocabulary. Restore the vocabulary it started with, or start a new run in another "
                     "out_dir (init_from cannot change the vocabulary either)")


def _over(defaults: dict, given: dict) -> dict:
    """``given`` with the keys it lacks taken from ``defaults`` (nested dicts merged; not ``model``)."""
    out = dict(defaults)
    for k, v in given.items():
        out[k] = _over(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model" else v
    return out


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts (except those a resume may change)."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and key != "model":
            out += config_changes(a, b, key + ".")
        elif a != b and key not in RESUMABLE_CHANGES:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _weights_checksum(decoder) -> float:
    """DDP keeps every rank's weights identical (the same averaged gradients, the same steps)."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in decoder.parameters()))


def _rng_state() -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": json.dumps([keys.tolist(), int(pos), int(has_gauss), float(cached)]),
            "python": json.dumps(random.getstate(), default=list)}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    keys, pos, has_gauss, cached = json.loads(s["numpy"])
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(s["python"])
    random.setstate((version, tuple(internal), gauss))


def _atomic_save(obj: dict, path: Path) -> None:
    """Write a checkpoint to a temporary file, then rename it over the old one.

    A failed write (full disk, quota) removes the temporary file and leaves the previous
    checkpoint as it was; the error says so instead of a traceback from the zip writer."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # also Ctrl-C mid-write: never a half-written .tmp left behind
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if not isinstance(e, (OSError, RuntimeError)):  # torch.save's writer raises RuntimeError on a failed write
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        why = (e.strerror if isinstance(e, OSError) and e.strerror
               else f"the write failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
        raise TrainError(f"{path}: cannot write the checkpoint ({why}); {kept}. Is the disk full? "
                         "Free some space, then continue with --resume") from None
