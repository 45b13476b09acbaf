"""Training: teacher forcing on cached encoder features, validated by real decoding.

One epoch = every training caption once, in length buckets (captions of similar length
batched together, longest first inside a batch, so no step is spent on padding).
Every epoch ends with greedy decoding of the validation images, scored with the COCO
metrics; that score drives lr decay, early stopping and the choice of the best model.

Files in ``out_dir``::

    config.yaml        the resolved training config
    last.pt            checkpoint of the last finished epoch (model, optimizer, scheduler,
                       RNG states, history); written to a temporary file then renamed
    best/              model directory (config.json + vocab.json + model.safetensors)
    metrics.jsonl      one line per epoch
    curves.png         loss and validation score per epoch
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import save_yaml
from .data.corpus import Corpus
from .data.text import Vocab
from .dataset import CaptionData
from .devices import autocast, check_precision, resolve_device
from .evaluate import evaluate_split
from .inference import DecodingSettings
from .features import FeatureStore
from .models import build_decoder
from .scheduled_sampling import ScheduledSamplingConfig, scheduled_sampling_forward
from .scst import CiderD, ScstConfig, scst_loss
from .modeldir import banned_ids, load_model_dir, save_model_dir


@dataclass
class DataConfig:
    corpus: str = ""  # corpus.json from `captioner prepare`
    vocab: str = ""  # vocab.json (default: next to the corpus)
    features: str = ""  # feature store directory from `captioner features`
    max_len: int = 30  # captions longer than this many words are truncated (the <end> kept)
    train_split: str = "train"
    val_split: str = "val"
    val_images: int = 0  # 0 = all validation images


@dataclass
class OptimConfig:
    lr: float = 4e-4
    batch_size: int = 64
    epochs: int = 20
    grad_clip: float = 5.0
    weight_decay: float = 0.0
    lr_decay: float = 0.8  # multiply the lr by this ...
    lr_patience: int = 2  # ... after this many epochs without a better validation score
    early_stop: int = 6  # stop after this many epochs without improvement (0 = never)
    restore_best: bool = False  # when the lr decays, go back to the best epoch's weights first
    max_minutes: float = 0.0  # wall-clock budget of this run (0 = none): the epoch in progress is cut short,
    #                           validated and kept if best, leaving time for its validation
    schedule: str = "plateau"  # "plateau": decay on a validation plateau; "cosine": lr follows a cosine from lr
    #                            to 0 over optim.epochs, or over max_minutes when a budget is set


@dataclass
class TrainConfig:
    arch: str = "sat"
    model: dict[str, Any] = field(default_factory=dict)  # architecture config (see models/<arch>.py)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val_metric: str = "CIDEr-D"  # or BLEU-4
    val_beam: int = 1
    init_from: str = ""  # a model directory to start from (staged training), instead of random weights
    objective: str = "xe"  # "xe": cross-entropy on the references; "scst": self-critical on CIDEr-D (needs init_from)
    scst: ScstConfig = field(default_factory=ScstConfig)
    scheduled_sampling: ScheduledSamplingConfig = field(default_factory=ScheduledSamplingConfig)  # xe only
    seed: int = 0
    threads: int = 0  # torch threads; 0 = leave the default
    out_dir: str = "runs/sat"
    progress: bool = True
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (a GPU when there is one); `captioner train --device`
    precision: str = "fp32"  # or bf16: forward and loss under bfloat16 autocast


def caption_loss(out, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on real target words only (mask from lengths), plus the model's regulariser."""
    T = out.logits.shape[1]
    targets = tokens[:, 1:T + 1]
    mask = torch.arange(T, device=lengths.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    ce = F.cross_entropy(out.logits[mask], targets[mask])
    total = ce + (out.extra_loss if out.extra_loss is not None else 0.0)
    return total, ce


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


def plot_curves(history: list[dict], path: Path, metric: str) -> None:
    import matplotlib

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


def train(cfg: TrainConfig, *, resume: bool = False, stop_after_steps: int | None = None) -> dict:
    """Train (or resume) and return a summary. ``stop_after_steps`` is for tests."""
    from tqdm import tqdm

    check_config(cfg)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    ckpt = out / "last.pt"
    if ckpt.exists() and not resume:
        raise TrainError(f"{out} already holds a training run (last.pt); use --resume to continue it, "
                         "or another out_dir")
    corpus = Corpus.load(cfg.data.corpus)
    vocab_path = cfg.data.vocab or str(Path(cfg.data.corpus).with_name("vocab.json"))
    vocab = Vocab.load(vocab_path)
    store = FeatureStore.open(cfg.data.features)
    enc = store.meta["encoder"]
    train_data = CaptionData(corpus, vocab, store, cfg.data.train_split, cfg.data.max_len)
    val_data = CaptionData(corpus, vocab, store, cfg.data.val_split, cfg.data.max_len)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.init_from:  # staged training: start from the weights of a model directory
        decoder, init_vocab, init_cfg = load_model_dir(cfg.init_from)
        if init_vocab.itos != vocab.itos:
            raise TrainError(f"init_from={cfg.init_from}: its vocabulary differs from {vocab_path}")
        if init_cfg["arch"] != cfg.arch:
            raise TrainError(f"init_from={cfg.init_from}: a {init_cfg['arch']} model, but this run is {cfg.arch}")
        for key in ENCODER_KEYS:
            if init_cfg.get("encoder", {}).get(key) != enc.get(key):
                raise TrainError(f"init_from={cfg.init_from}: trained on features with encoder {key}="
                                 f"{init_cfg.get('encoder', {}).get(key)!r}, but {cfg.data.features} has {enc.get(key)!r}")
        decoder.train()
    else:
        model_cfg = {**cfg.model, "vocab_size": len(vocab), "feature_dim": enc["channels"]}
        decoder = build_decoder(cfg.arch, model_cfg, vocab=vocab)
        if decoder.word_vector_report is not None:
            print(decoder.word_vector_report.summary(), flush=True)
    decoder.to(device)
    opt = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=cfg.optim.lr,
                           weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.optim.lr_decay,
                                                       patience=cfg.optim.lr_patience, threshold=0.0)
    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": [], "step": 0}
    if resume and ckpt.exists():
        c = torch.load(ckpt, map_location="cpu", weights_only=True)
        changed = _config_changes(json.loads(c["config"]), asdict(cfg)) if "config" in c else []
        if changed:
            raise TrainError(f"--resume: {out} was trained with another config ({'; '.join(changed[:5])}); resume "
                             "with the same settings (only optim.epochs, progress, threads and device may change)")
        _check_resume_vocab(c, decoder, vocab, vocab_path, ckpt)
        decoder.load_state_dict(c["model"])
        opt.load_state_dict(c["optimizer"])
        sched.load_state_dict(c["scheduler"])
        _set_rng_state(c["rng"])
        state = json.loads(c["state"])
        _write_logs(state["history"], out, cfg.val_metric)  # in case a kill came between checkpoint and logs
        if cfg.optim.early_stop and state["bad_epochs"] >= cfg.optim.early_stop:
            print(f"--resume: {out} had already stopped early at epoch {state['epoch']}")
            return _summary(state, out)
    elif resume:
        print(f"--resume: no checkpoint in {out}, starting from scratch")
    save_yaml(cfg, out / "config.yaml")

    info = {"encoder": enc, "decoding": DecodingSettings(beam_size=3, max_len=cfg.data.max_len).to_dict(),
            "training": {"config": asdict(cfg), "corpus": corpus.name,
                         "train_images": len(train_data.images), "train_captions": len(train_data)}}
    banned = banned_ids(vocab, False)  # <unk> is never output, in validation as in deployment
    val_decoding = DecodingSettings(beam_size=cfg.val_beam, max_len=cfg.data.max_len)
    metrics_needed = ["BLEU-4", "CIDEr-D"] if cfg.val_metric in ("BLEU-4", "CIDEr-D") else [cfg.val_metric]
    if cfg.init_from and state["epoch"] == 0:
        # the starting point is the score to beat: stage 2 must not ship something worse than stage 1
        scores, _, _ = evaluate_split(decoder, vocab, val_data, val_decoding, metrics=metrics_needed,
                                      limit=cfg.data.val_images)
        state.update(best=scores[cfg.val_metric], best_epoch=0)
        sched.best = scores[cfg.val_metric]
        save_model_dir(out / "best", decoder, vocab, {**info, "metrics": {"val": {
            "split": cfg.data.val_split, "beam": cfg.val_beam, "epoch": 0, **scores}}})
        print(f"init_from {cfg.init_from}: val {cfg.val_metric} {state['best']:.4f} to beat", flush=True)
    steps_run = 0
    scst = cfg.objective == "scst"
    if scst:
        cider = CiderD({im: [list(t) for t in toks] for im, toks in train_data.ref_tokens.items()})
        print(f"scst: CIDEr-D document frequencies from {len(train_data.images)} training images' references",
              flush=True)
    t_start = time.perf_counter()
    budget = cfg.optim.max_minutes * 60.0
    reserve = 0.1 * budget  # time kept for the last validation; the measured one once there is one
    out_of_time = False

    def step_loss(idx: torch.Tensor):
        if scst:
            images = [train_data.images[i] for i in idx.tolist()]
            with autocast(device, cfg.precision):
                loss, reward, baseline = scst_loss(decoder, train_data.features(idx.numpy()).to(device), images,
                                                   cider, vocab.itos, start_id=vocab.start_id, end_id=vocab.end_id,
                                                   cfg=cfg.scst, banned=banned)
            return loss, {"reward": reward, "baseline": baseline}
        feats, tokens, lengths = (t.to(device) for t in train_data.batch(idx))
        with autocast(device, cfg.precision):
            if ss_prob > 0:
                out_ = scheduled_sampling_forward(decoder, feats, tokens, lengths, ss_prob)
            else:
                out_ = decoder(feats, tokens, lengths)
            loss, ce = caption_loss(out_, tokens, lengths)
        return loss, {"ce": ce.item()}

    while state["epoch"] < cfg.optim.epochs and not out_of_time:
        epoch = state["epoch"] + 1
        rng = np.random.default_rng([cfg.seed, epoch])  # the data order depends only on (seed, epoch)
        ss_prob = 0.0 if scst else cfg.scheduled_sampling.prob(epoch)
        decoder.train()
        if scst:  # images, not captions: each image's samples are scored against all its references
            order = torch.from_numpy(rng.permutation(len(train_data.images)))
            batches = list(order.split(cfg.scst.images_per_batch))
        else:
            batches = train_data.batches(cfg.optim.batch_size, rng)
        t0 = time.perf_counter()
        tot = 0.0
        sums: dict[str, float] = {}
        seen = 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.optim.epochs}", unit="batch", disable=not cfg.progress,
                   dynamic_ncols=True)
        for b, idx in enumerate(bar):
            if budget and time.perf_counter() - t_start > budget - reserve:
                out_of_time = True  # validate what this epoch has learnt so far, then stop
                break
            if cfg.optim.schedule == "cosine":
                if budget:
                    frac = (time.perf_counter() - t_start) / max(budget - reserve, 1e-9)
                else:
                    frac = (state["epoch"] + b / len(batches)) / cfg.optim.epochs
                for g in opt.param_groups:
                    g["lr"] = cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            loss, stats = step_loss(idx)
            _stop_if_not_finite("the loss", loss, state["step"] + 1, epoch, cfg, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.optim.grad_clip)
                _stop_if_not_finite("the gradient norm", norm, state["step"] + 1, epoch, cfg, out)
            opt.step()
            n = len(idx)
            tot += loss.item() * n
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * n
            seen += n
            state["step"] += 1
            steps_run += 1
            shown = {"reward": f"{sums['reward'] / seen:.3f}"} if scst else {"loss": f"{tot / seen:.3f}"}
            bar.set_postfix(**shown, **{("imgs_s" if scst else "caps_s"): f"{seen / (time.perf_counter() - t0):.0f}"})
            if stop_after_steps is not None and steps_run >= stop_after_steps:
                return {"stopped_at_step": state["step"]}
        bar.close()
        if seen == 0:  # the budget ran out before this epoch's first step
            print(f"optim.max_minutes={cfg.optim.max_minutes} reached after epoch {state['epoch']}", flush=True)
            break
        _stop_if_weights_not_finite(decoder, state["step"], epoch, cfg, out)
        train_secs = time.perf_counter() - t0
        t1 = time.perf_counter()
        scores, cands, _ = evaluate_split(decoder, vocab, val_data, val_decoding, metrics=metrics_needed,
                                          limit=cfg.data.val_images)
        score = scores[cfg.val_metric]
        improved = score > state["best"]
        lr_used = opt.param_groups[0]["lr"]
        if cfg.optim.schedule == "plateau":
            sched.step(score)
        reserve = max(reserve, 1.2 * (time.perf_counter() - t1))
        row = {"epoch": epoch, "train_loss": tot / seen, **{f"train_{k}": v / seen for k, v in sums.items()},
               ("images_per_s" if scst else "captions_per_s"): round(seen / train_secs, 1),
               "train_seconds": round(train_secs, 1), "val_seconds": round(time.perf_counter() - t1, 1),
               "lr": lr_used, "elapsed_seconds": round(time.perf_counter() - t_start, 1), "cut_short": out_of_time,
               **({"scheduled_sampling_prob": ss_prob} if ss_prob else {}),
               "val": {k: round(v, 5) for k, v in scores.items()},
               "example": next(iter(cands.values()))}
        state["history"].append(row)
        if improved:
            state.update(best=score, best_epoch=epoch, bad_epochs=0)
            save_model_dir(out / "best", decoder, vocab,
                           {**info, "metrics": {"val": {"split": cfg.data.val_split, "beam": cfg.val_beam,
                                                        "epoch": epoch, **scores}}})
        else:
            state["bad_epochs"] += 1
            if cfg.optim.restore_best and opt.param_groups[0]["lr"] < lr_used and (out / "best").is_dir():
                # the lr just decayed: continue from the best weights at the lower rate (one-run staging)
                _restore_weights(decoder, out / "best")
                row["restored_epoch"] = state["best_epoch"]
        state["epoch"] = epoch
        _atomic_save({"model": decoder.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "rng": _rng_state(), "state": json.dumps(state), "config": json.dumps(asdict(cfg)),
                      "vocab": json.dumps(vocab.itos)}, ckpt)
        _write_logs(state["history"], out, cfg.val_metric)
        speed = f"{row['images_per_s']} images/s" if scst else f"{row['captions_per_s']} captions/s"
        print(f"epoch {epoch}{' (cut short by optim.max_minutes)' if out_of_time else ''}: loss {row['train_loss']:.3f}"
              f"{'  reward %.3f' % row['train_reward'] if scst else ''}  val {cfg.val_metric} {score:.4f}"
              f"{' (best)' if improved else ''}  lr {row['lr']:.2e}  {speed}"
              f"{'  (back to epoch %d)' % row['restored_epoch'] if 'restored_epoch' in row else ''}",
              flush=True)
        if cfg.optim.early_stop and state["bad_epochs"] >= cfg.optim.early_stop:
            print(f"early stop: no better {cfg.val_metric} for {state['bad_epochs']} epochs")
            break
    return _summary(state, out, out_of_time=out_of_time)


def _restore_weights(decoder, model_dir: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    decoder.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})


ENCODER_KEYS = ("name", "image_size", "grid", "resize", "mean", "std")
RESUMABLE_CHANGES = {"optim.epochs", "optim.max_minutes", "progress", "threads", "device"}


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts (except those a resume may change)."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and key != "model":
            out += _config_changes(a, b, key + ".")
        elif a != b and key not in RESUMABLE_CHANGES:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _write_logs(history: list[dict], out: Path, metric: str) -> None:
    """metrics.jsonl and curves.png, rewritten whole from the checkpointed history (no duplicates on resume)."""
    tmp = out / "metrics.jsonl.tmp"
    try:
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
        os.replace(tmp, out / "metrics.jsonl")
        if history:
            plot_curves(history, out / "curves.png", metric)
    except OSError as e:  # full disk: the checkpoint holds the history, --resume writes the logs again
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise TrainError(f"{out}: cannot write metrics.jsonl / curves.png ({e.strerror or e}); the checkpoint "
                         "holds them: free some space, then --resume writes them again") from None


def _stop_if_not_finite(what: str, value: torch.Tensor, step: int, epoch: int, cfg: "TrainConfig", out: Path) -> None:
    """A NaN or infinite loss (or gradient) ends training with an error naming the step: nothing
    after it is saved, so last.pt and best/ stay those of the last good epoch."""
    if bool(torch.isfinite(value)):
        return
    raise TrainError(f"training diverged at step {step} (epoch {epoch}): {what} is {float(value.detach())}. "
                     f"{_kept(out)} Start again with a lower optim.lr (now {cfg.optim.lr:g})"
                     f"{'' if cfg.optim.grad_clip else ' and gradient clipping on (optim.grad_clip, e.g. 5)'}, "
                     "in another out_dir (or init_from its best/)")


def _stop_if_weights_not_finite(decoder, step: int, epoch: int, cfg: "TrainConfig", out: Path) -> None:
    bad = [name for name, p in decoder.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainError(f"training diverged by step {step} (epoch {epoch}): weights {', '.join(bad[:3])} hold NaN "
                         f"or infinite values. {_kept(out)} Start again with a lower optim.lr (now {cfg.optim.lr:g}), "
                         "in another out_dir (or init_from its best/)")


def _kept(out: Path) -> str:
    kept = [str(p) for p in (out / "last.pt", out / "best") if p.exists()]
    return (f"Nothing from this epoch was saved; {' and '.join(kept)} {'are' if len(kept) > 1 else 'is'} kept "
            "from before." if kept else "No checkpoint had been saved yet.")


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


def _summary(state: dict, out: Path, *, out_of_time: bool = False) -> dict:
    return {"best": state["best"], "best_epoch": state["best_epoch"], "epochs": state["epoch"],
            "out_dir": str(out), "history": state["history"], "out_of_time": out_of_time}


def check_config(cfg: TrainConfig) -> None:
    """Catch config mistakes before any work is done (not after the first epoch)."""
    from .metrics import METRIC_NAMES, java_available
    from .models import get_architecture

    if not cfg.data.corpus or not cfg.data.features:
        raise TrainError("set data.corpus (corpus.json from `captioner prepare`) and data.features "
                         "(a store from `captioner features`), in the YAML config or as data.corpus=...")
    if cfg.val_metric not in METRIC_NAMES or cfg.val_metric == "SPICE":
        raise TrainError(f"val_metric={cfg.val_metric!r}: use one of BLEU-1..4, METEOR, ROUGE-L, CIDEr-D")
    if cfg.val_metric == "METEOR" and not java_available()[0]:
        raise TrainError("val_metric=METEOR needs Java; use CIDEr-D or BLEU-4")
    get_architecture(cfg.arch)  # raises with the list of architectures
    check_precision(cfg.precision, resolve_device(cfg.device))  # a GPU that is not there, an unknown precision
    if cfg.optim.batch_size < 1 or cfg.optim.epochs < 1:
        raise TrainError("optim.batch_size and optim.epochs must be >= 1")
    if not (math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0):
        raise TrainError(f"optim.lr={cfg.optim.lr}: must be a finite number > 0 (e.g. 4e-4)")
    if cfg.val_beam < 1 or cfg.data.max_len < 1:
        raise TrainError("val_beam and data.max_len must be >= 1")
    if not (math.isfinite(cfg.optim.grad_clip) and cfg.optim.grad_clip >= 0):
        raise TrainError(f"optim.grad_clip={cfg.optim.grad_clip}: must be a finite number >= 0 (the largest gradient "
                         "norm; 0 turns clipping off)")
    if not (math.isfinite(cfg.optim.weight_decay) and cfg.optim.weight_decay >= 0):
        raise TrainError(f"optim.weight_decay={cfg.optim.weight_decay}: must be a finite number >= 0")
    if not 0 <= cfg.threads <= 1024:
        raise TrainError(f"threads={cfg.threads}: must be from 1 to 1024 torch threads, or 0 to leave the default")
    for name, value in (("optim.lr_patience", cfg.optim.lr_patience), ("optim.early_stop", cfg.optim.early_stop),
                        ("data.val_images", cfg.data.val_images)):
        if value < 0:
            raise TrainError(f"{name}={value}: must be >= 0")
    if not 0 < cfg.optim.lr_decay < 1:
        raise TrainError(f"optim.lr_decay={cfg.optim.lr_decay}: must be between 0 and 1 (exclusive); "
                         "for no decay set optim.lr_patience to a number larger than optim.epochs")
    if not (math.isfinite(cfg.optim.max_minutes) and 0 <= cfg.optim.max_minutes <= 10_000_000):
        raise TrainError(f"optim.max_minutes={cfg.optim.max_minutes}: must be a number of minutes >= 0 (0 = no budget)")
    if cfg.optim.schedule not in ("plateau", "cosine"):
        raise TrainError(f"optim.schedule={cfg.optim.schedule!r}: use plateau (decay when validation stops "
                         "improving) or cosine (from optim.lr to 0 over the epochs, or over optim.max_minutes)")
    ss = cfg.scheduled_sampling
    if not (0 <= ss.max_prob <= 1 and 0 <= ss.increase_prob <= 1 and ss.increase_every >= 1 and ss.start_epoch >= 1):
        raise TrainError("scheduled_sampling: max_prob and increase_prob must be from 0 to 1, increase_every and "
                         "start_epoch >= 1")
    if cfg.objective not in ("xe", "scst"):
        raise TrainError(f"objective={cfg.objective!r}: use xe (cross-entropy) or scst (self-critical, after xe)")
    if cfg.objective == "scst":
        if not cfg.init_from:
            raise TrainError("objective=scst fine-tunes a trained model: set init_from=DIR (e.g. the best/ of a "
                             "cross-entropy run); from random weights its samples earn no reward to learn from")
        if cfg.scst.baseline not in ("mean", "greedy"):
            raise TrainError(f"scst.baseline={cfg.scst.baseline!r}: use mean (of the other samples) or greedy")
        if not 2 <= cfg.scst.samples <= 100 or not 1 <= cfg.scst.max_len <= 100 or cfg.scst.images_per_batch < 1:
            raise TrainError("scst.samples must be 2..100, scst.max_len 1..100 and scst.images_per_batch >= 1")
    if cfg.init_from and cfg.model:
        raise TrainError("init_from takes the architecture sizes from that model directory; leave model empty")
    if cfg.init_from:
        from .modeldir import resolve_model_path

        resolve_model_path(cfg.init_from)  # a clear error for a wrong path, before any work


class TrainError(ValueError):
    pass
