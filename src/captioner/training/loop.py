"""Training: teacher forcing on cached encoder features, validated by real decoding.

One epoch = every training caption once, in length buckets (captions of similar length
batched together, longest first inside a batch, so no step is spent on padding).
Every epoch ends with decoding of the validation images (greedy unless ``val_beam``, with the
``decoding`` defaults; the moving average of the weights with ``optim.ema``), scored with the COCO
metrics; that score drives lr decay, early stopping and the choice of the best model.

Files in ``out_dir``::

    config.yaml        the resolved training config
    last.pt            checkpoint of the last finished epoch (model, optimizer, scheduler,
                       RNG states, history); written to a temporary file then renamed
    best/              model directory (config.json + vocab.json + model.safetensors)
    metrics.jsonl      one line per epoch
    curves.png         loss and validation score per epoch

With ``then`` (a list of later stages), each stage is such a run of its own, into ``out_dir-name``,
starting from the best/ of the stage before it (:func:`stage_configs`).

Under ``torchrun --nproc_per_node N -m captioner train`` each of the N processes (ranks) runs
this same code on the decoder wrapped in DistributedDataParallel. ``optim.batch_size`` stays the
global batch: every rank builds the same list of batches (the order depends only on the seed and
the epoch) and takes every N-th caption of each, so the gradient DDP averages is the one a single
process computes on the whole batch, and ``optim.lr`` means what it means for one process.
Validation images are decoded in N shares and scored on rank 0, whose score every rank uses; rank
0's clock decides the time budget; rank 0 alone writes files and prints. A failure on one rank
(a bad setting, a file it cannot read or write) stops every rank with its message.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from captioner.config import save_yaml
from captioner.data.captions import CaptionData
from captioner.data.corpus import Corpus
from captioner.data.features import FeatureStore
from captioner.data.prepare import check_vocab_matches
from captioner.data.text import Vocab
from captioner.evaluation.evaluate import decode_images
from captioner.evaluation.metrics import ENGLISH_ONLY, compute_metrics
from captioner.evaluation.tokenization import choose_tokenizer
from captioner.inference.modeldir import load_model_dir
from captioner.models import build_decoder
from captioner.runtime.devices import resolve_device, split_precision
from captioner.runtime.distributed import Group, env_world
from captioner.runtime.progress import progress_bar
from captioner.training.budget import Budget
from captioner.training.checkpoint import load_checkpoint, restore_best, save_best, save_checkpoint
from captioner.training.config import TrainConfig, TrainError, check_run
from captioner.training.logs import write_logs
from captioner.training.loss import BatchLoss
from captioner.training.outdir import OutDirLock, check_out_dir
from captioner.training.ranks import process_group_for, same_start, seed_rank, warnings_on_rank0_only
from captioner.training.run import Run
from captioner.training.stages import check_stages, same_start_model, stage_configs
from captioner.training.tuned import TunedDecoder, on_store, param_groups
from captioner.training.warmup import warmed_up, warmup_factor

ENCODER_KEYS = ("name", "image_size", "grid", "resize", "mean", "std")  # what init_from's features must share


def train(cfg: TrainConfig, *, resume: bool = False, stop_after_steps: int | None = None,
          on_start: Callable[[], None] | None = None) -> dict:
    """Train (or resume) and return a summary; under torchrun, one rank of a DDP run (see the module's
    docstring). With ``cfg.then``, the stages one after the other (:func:`stage_configs`); ``--resume``
    skips the finished ones. ``on_start`` runs on rank 0 once the settings and data have passed their
    checks, before the first step. ``stop_after_steps`` is for tests."""
    stages = stage_configs(cfg)
    if len(stages) == 1:
        return _train_stage(cfg, resume, stop_after_steps, on_start)
    rank, world = env_world()
    check_stages(cfg, stages, world, resume)
    done = []
    # under torchrun one process group for all the stages: set up again after a teardown, a group would
    # meet in the same keys of torchrun's store as the last one, and a rank could read the old addresses
    with process_group_for(cfg):
        for k, stage in enumerate(stages):
            if rank == 0:
                print(f"stage {k + 1} of {len(stages)}: {stage.out_dir}"
                      + (f" (from {stage.init_from})" if stage.init_from else ""), flush=True)
            if k:
                same_start_model(stage, rank)
            summary = _train_stage(stage, resume, stop_after_steps, on_start if k == 0 else None)
            if "stopped_at_step" in summary:
                return summary
            done.append({key: summary[key] for key in ("out_dir", "best", "best_epoch", "epochs", "out_of_time")})
    return {**summary, "stages": done}


def _train_stage(cfg: TrainConfig, resume: bool, stop_after_steps: int | None,
                 on_start: Callable[[], None] | None = None) -> dict:
    """One training run: ``out_dir`` from ``init_from`` or random weights. ``precision: auto`` is decided here, once,
    and the run records what it decided (bf16 or fp32): a resume on another device or host keeps it or is refused."""
    if cfg.precision == "auto":
        cfg = dataclasses.replace(cfg, precision=split_precision(cfg.precision, resolve_device(cfg.device))[1])
    with process_group_for(cfg) as group, warnings_on_rank0_only(group):
        run = group.agree(lambda: setup(cfg, group, resume))  # config checks, data, model, optimizer, resume state
        if on_start is not None and group.rank == 0:
            on_start()
        try:
            start(run)  # the ranks agree on where they start; rank 0 writes config.yaml; init_from's score to beat
            while run.state["epoch"] < cfg.optim.epochs and not (run.budget.out or run.stopped_early):
                epoch = run.state["epoch"] + 1
                stats = train_epoch(run, epoch, stop_after_steps)
                if stats["stopped_at_step"]:
                    return {"stopped_at_step": stats["stopped_at_step"]}
                if stats["seen"] == 0:  # the budget ran out before this epoch's first step
                    run.say(f"optim.max_minutes={cfg.optim.max_minutes} reached after epoch {run.state['epoch']}")
                    break
                _stop_if_weights_not_finite(run.decoder, run.state["step"], epoch, cfg, run.out)
                scores, cands, val_seconds = validate(run)
                end_epoch(run, epoch, stats, scores, cands, val_seconds)  # lr, best/, restore_best, last.pt, logs
            return _summary(run.state, run.out, out_of_time=run.budget.out)
        finally:
            run.model = None  # DDP's reducer goes before the process group does
            if run.lock is not None:
                run.lock.release()


def setup(cfg: TrainConfig, group: Group, resume: bool) -> Run:
    """Everything before the first step: config checks, the out_dir (rank 0 locks it: one run at a
    time), data, model, optimizer and, with ``resume``, the state of ``last.pt``. Every rank runs it
    (``train`` makes a failure on one stop them all); nothing but the lock is written here."""
    check_run(cfg, group.world)
    out = Path(cfg.out_dir)
    if not (out / "last.pt").exists():  # a new run: in a folder of its own
        check_out_dir(out)
    lock = OutDirLock(out) if group.rank == 0 else None
    try:
        if (out / "last.pt").exists() and not resume:
            raise TrainError(f"{out} already holds a training run (last.pt); use --resume to continue it, "
                             "or another out_dir")
        run = _setup(cfg, group, resume, out)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def _setup(cfg: TrainConfig, group: Group, resume: bool, out: Path) -> Run:
    """setup, once the out_dir is this run's: data, model, optimizer and the state of last.pt."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = out / "last.pt"
    corpus = Corpus.load(cfg.data.corpus)
    vocab_path = cfg.data.vocab or str(Path(cfg.data.corpus).with_name("vocab.json"))
    vocab = Vocab.load(vocab_path)
    check_vocab_matches(corpus, cfg.data.corpus, vocab, vocab_path)
    store = FeatureStore.open(cfg.data.features)
    enc = store.meta["encoder"]
    train_data = CaptionData(corpus, vocab, store, cfg.data.train_split, cfg.data.max_len)
    val_data = CaptionData(corpus, vocab, store, cfg.data.val_split, cfg.data.max_len)
    if cfg.val_metric in ENGLISH_ONLY and choose_tokenizer("auto", val_data.refs) != "ptb":
        raise TrainError(f"val_metric={cfg.val_metric}: {ENGLISH_ONLY[cfg.val_metric]}, and the captions of "
                         f"{cfg.data.corpus} are not English; use CIDEr-D or BLEU-4")

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP copies rank 0's anyway)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    decoder, init_cfg = _build_decoder(cfg, vocab, vocab_path, enc, group)
    decoder = on_store(cfg, decoder, enc, init_cfg).to(device)  # on a trunk store: with the encoder's last units
    if group.rank:  # dropout and sampling draw other numbers on each rank
        seed_rank(cfg.seed, group.rank)
    opt = torch.optim.Adam(param_groups(cfg, decoder), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.optim.lr_decay,
                                                       patience=cfg.optim.lr_patience, threshold=0.0)
    ema = _moving_average(decoder, cfg.optim.ema) if cfg.optim.ema else None
    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": [], "step": 0}
    resumed = resume and ckpt.exists()
    if resumed:
        state = load_checkpoint(ckpt, cfg, group, decoder, opt, sched, vocab, vocab_path, ema)
    info = {"encoder": enc, "decoding": cfg.decoding_settings().to_dict(),
            "training": {"config": asdict(cfg), "corpus": corpus.name,
                         "train_images": len(train_data.images), "train_captions": len(train_data)}}
    model = BatchLoss(decoder, train_data, vocab, cfg, group)
    run = Run(cfg, group, device, out, vocab, train_data, val_data, decoder, model, opt, sched, state, info,
              resumed=resumed, ema=ema)
    if resume and not resumed:
        run.say(f"--resume: no checkpoint in {out}, starting from scratch")
    return run


def start(run: Run) -> None:
    """Before the first epoch: every rank must start from the same point; DDP wraps the model; rank 0
    writes config.yaml (and, on --resume, the logs again); a run from ``init_from`` scores its
    starting model, the score to beat."""
    cfg, group, state = run.cfg, run.group, run.state
    where = group.gather((state["epoch"], state["step"]))
    group.agree(lambda: same_start(where, run.out) if group.rank == 0 else None)
    if group.world > 1:
        run.model = DistributedDataParallel(run.model)
    group.agree(lambda: _first_writes(run) if group.rank == 0 else None)
    if run.stopped_early:
        run.say(f"--resume: {run.out} had already stopped early at epoch {state['epoch']}")
    elif cfg.init_from and state["epoch"] == 0:
        # the starting point is the score to beat: stage 2 must not ship something worse than stage 1
        scores, _, _ = validate(run)
        state.update(best=scores[cfg.val_metric], best_epoch=0)
        run.sched.best = scores[cfg.val_metric]
        group.agree(lambda: save_best(run, scores, 0) if group.rank == 0 else None)
        run.say(f"init_from {cfg.init_from}: val {cfg.val_metric} {state['best']:.4f} to beat")
    if run.scst and not run.stopped_early:
        run.say(f"scst: CIDEr-D document frequencies from {len(run.train_data.images)} training images' "
                "references")
    # the clock starts with the first epoch; on --resume it goes on from the checkpoint's time, so a budget
    # and its cosine cover the whole run, not each process
    clock = state.get("clock", {})
    run.budget = Budget(cfg.optim.max_minutes, group, spent=clock.get("seconds", 0.0),
                        longest_val=clock.get("longest_val", 0.0))


def train_epoch(run: Run, epoch: int, stop_after_steps: int | None = None) -> dict:
    """One pass over the training data, cut short when the time budget is up: the epoch's mean loss
    and statistics over the captions (images for SCST) it saw, and its duration."""
    cfg = run.cfg
    rng = np.random.default_rng([cfg.seed, epoch])  # the data order depends only on (seed, epoch): on every rank
    if run.scst:  # images, not captions: each image's samples are scored against all its references
        order = torch.from_numpy(rng.permutation(len(run.train_data.images)))
        batches = list(order.split(cfg.scst.images_per_batch))
    else:
        batches = (run.train_data.image_batches(cfg.optim.batch_size, rng) if isinstance(run.decoder, TunedDecoder)
                   else run.train_data.batches(cfg.optim.batch_size, rng))  # encoder units: one pass per image
    ss_prob = 0.0 if run.scst else cfg.scheduled_sampling.prob(epoch)
    run.model.train()
    t0 = time.perf_counter()
    tot, sums, seen = 0.0, {}, 0
    bar = progress_bar(batches, desc=f"epoch {epoch}/{cfg.optim.epochs}", unit="batch",
                       disable=not cfg.progress or run.group.rank != 0)  # plain lines when not on a terminal
    for b, idx in enumerate(bar):
        used = run.budget.check()
        if run.budget.out:
            break  # validate what this epoch has learnt so far, then stop
        if cfg.optim.schedule == "cosine":
            frac = used if run.budget.seconds else (epoch - 1 + b / len(batches)) / cfg.optim.epochs
            for g in run.opt.param_groups:
                g["lr"] = g.get("base_lr", cfg.optim.lr) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        with warmed_up(run.opt, warmup_factor(run.state["step"], cfg.optim.warmup)):  # the first optim.warmup steps
            loss, stats = train_step(run, idx.numpy(), ss_prob, epoch)
        tot += loss * len(idx)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v * len(idx)
        seen += len(idx)
        shown = {"reward": f"{sums['reward'] / seen:.3f}"} if run.scst else {"loss": f"{tot / seen:.3f}"}
        bar.set_postfix(**shown, **{("imgs_s" if run.scst else "caps_s"): f"{seen / (time.perf_counter() - t0):.0f}"})
        run.steps_run += 1
        if stop_after_steps is not None and run.steps_run >= stop_after_steps:
            return {"stopped_at_step": run.state["step"]}
    bar.close()
    return {"stopped_at_step": None, "seen": seen, "loss": tot / max(seen, 1),
            "means": {k: v / max(seen, 1) for k, v in sums.items()}, "seconds": time.perf_counter() - t0,
            "ss_prob": ss_prob}


def train_step(run: Run, batch: np.ndarray, ss_prob: float, epoch: int) -> tuple[float, dict[str, float]]:
    """One optimizer step on ``batch`` (positions of captions; of images for SCST). Each rank computes
    its share of the loss; the loss and statistics returned are the whole batch's, as one process
    computes them."""
    loss, stats = run.model(batch, ss_prob)
    total, *values = run.group.sum([loss.item(), *stats.values()])
    _stop_if_not_finite("the loss", total, run.state["step"] + 1, epoch, run.cfg, run.out)  # every rank at once
    run.opt.zero_grad(set_to_none=True)
    (loss * run.group.world).backward()  # DDP averages the ranks' gradients: the sum of the shares' gradients
    if run.cfg.optim.grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(run.decoder.parameters(), run.cfg.optim.grad_clip)
        _stop_if_not_finite("the gradient norm", norm, run.state["step"] + 1, epoch, run.cfg, run.out)
    run.opt.step()
    if run.ema is not None:
        run.ema.update_parameters(run.decoder)
    run.state["step"] += 1
    return total, dict(zip(stats, values))


def validate(run: Run) -> tuple[dict, dict[str, str], float]:
    """Decode the validation images (under torchrun each rank a share) and score them on rank 0; every
    rank gets rank 0's scores, which drive the lr, early stopping, the best model and the budget.
    Returns (scores, caption per image, seconds)."""
    cfg, group, data = run.cfg, run.group, run.val_data
    t0 = time.perf_counter()
    if run.ema is not None:  # batch norm's running statistics come from each rank's share: rank 0's for all
        group.broadcast_tensors(list(run.ema.module.buffers()))
    elif isinstance(run.decoder, TunedDecoder):  # the encoder's BatchNorm statistics (encoder.batchnorm=train) too
        group.broadcast_tensors(list(run.decoder.buffers()))
    n = len(data.images) if not cfg.data.val_images else min(cfg.data.val_images, len(data.images))
    settings = cfg.val_decoding()
    share = range(n * group.rank // group.world, n * (group.rank + 1) // group.world)
    cands = {k: v for part in group.gather(decode_images(run.kept, run.vocab, data, settings, share))
             for k, v in part.items()}
    metrics = ["BLEU-4", "CIDEr-D"] if cfg.val_metric in ("BLEU-4", "CIDEr-D") else [cfg.val_metric]
    scores = group.on_rank0(lambda: compute_metrics({k: data.refs[k] for k in cands}, cands, metrics=metrics).scores)
    return scores, cands, time.perf_counter() - t0


def end_epoch(run: Run, epoch: int, stats: dict, scores: dict, cands: dict[str, str], val_seconds: float) -> None:
    """After an epoch's validation: the lr schedule, the best model, restore_best, then last.pt and
    the logs (rank 0), and the epoch's line."""
    cfg, state = run.cfg, run.state
    score = scores[cfg.val_metric]
    improved = score > state["best"]
    lr_used = run.opt.param_groups[0]["lr"]
    if cfg.optim.schedule == "plateau":
        run.sched.step(score)
    run.budget.validated(val_seconds)
    speed_key = "images_per_s" if run.scst else "captions_per_s"
    row = {"epoch": epoch, "train_loss": stats["loss"], **{f"train_{k}": v for k, v in stats["means"].items()},
           speed_key: round(stats["seen"] / stats["seconds"], 1),
           "train_seconds": round(stats["seconds"], 1), "val_seconds": round(val_seconds, 1),
           "lr": lr_used, "elapsed_seconds": round(run.budget.elapsed(), 1), "cut_short": run.budget.out,
           **({"scheduled_sampling_prob": stats["ss_prob"]} if stats["ss_prob"] else {}),
           "val": {k: round(v, 5) for k, v in scores.items()},
           "example": next(iter(cands.values()))}
    state["history"].append(row)
    if improved:
        state.update(best=score, best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
        if cfg.optim.restore_best and run.opt.param_groups[0]["lr"] < lr_used and restore_best(run):
            # the lr just decayed: continue from the best weights at the lower rate (one-run staging)
            row["restored_epoch"] = state["best_epoch"]
    state["epoch"] = epoch
    state["clock"] = run.budget.to_state()  # --resume continues the clock
    save_checkpoint(run, scores if improved else None)
    run.say(f"epoch {epoch}{' (cut short by optim.max_minutes)' if run.budget.out else ''}: loss "
            f"{row['train_loss']:.3f}{'  reward %.3f' % row['train_reward'] if run.scst else ''}  val "
            f"{cfg.val_metric} {score:.4f}{' (best)' if improved else ''}  lr {row['lr']:.2e}  {row[speed_key]} "
            f"{'images' if run.scst else 'captions'}/s"
            f"{'  (back to epoch %d)' % row['restored_epoch'] if 'restored_epoch' in row else ''}")
    if run.stopped_early:
        run.say(f"early stop: no better {cfg.val_metric} for {state['bad_epochs']} epochs")



# ----------------------------------------------------------------------------- setup and run details

def _build_decoder(cfg: TrainConfig, vocab: Vocab, vocab_path: str, enc: dict, group: Group
                   ) -> tuple[torch.nn.Module, dict | None]:
    """(random weights for ``cfg.arch``, None), or (those of ``init_from``, its config), checked to fit the vocabulary
    and features."""
    if cfg.init_from:  # staged training: start from the weights of a model directory
        decoder, init_vocab, init_cfg = load_model_dir(cfg.init_from)
        if init_vocab.itos != vocab.itos:
            raise TrainError(f"init_from={cfg.init_from}: its vocabulary differs from {vocab_path}")
        if init_cfg["arch"] != cfg.arch:
            raise TrainError(f"init_from={cfg.init_from}: a {init_cfg['arch']} model, but this run is {cfg.arch}")
        for key in ENCODER_KEYS:
            if init_cfg.get("encoder", {}).get(key) != enc.get(key):
                raise TrainError(f"init_from={cfg.init_from}: trained on features with encoder {key}="
                                 f"{init_cfg.get('encoder', {}).get(key)!r}, but {cfg.data.features} has "
                                 f"{enc.get(key)!r}")
        return decoder.train(), init_cfg
    model_cfg = {**cfg.model, "vocab_size": len(vocab), "feature_dim": enc["channels"]}
    decoder = build_decoder(cfg.arch, model_cfg, vocab=vocab)
    if decoder.word_vector_report is not None and group.rank == 0:
        print(decoder.word_vector_report.summary(), flush=True)
    return decoder, None


def _moving_average(decoder: torch.nn.Module, decay: float):
    """optim.ema: torch's AveragedModel keeping avg = decay * avg + (1 - decay) * weights (buffers too);
    its first update copies the weights."""
    ema = AveragedModel(decoder, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.module.eval()
    return ema


def _first_writes(run: Run) -> None:
    """Rank 0, before the first epoch: the out_dir, config.yaml, and on --resume the logs (a kill may have
    come between the checkpoint and the logs)."""
    run.out.mkdir(parents=True, exist_ok=True)
    if run.resumed:
        write_logs(run.state["history"], run.out, run.cfg.val_metric)
    if not run.stopped_early:
        save_yaml(run.cfg, run.out / "config.yaml")


def _summary(state: dict, out: Path, *, out_of_time: bool = False) -> dict:
    return {"best": state["best"], "best_epoch": state["best_epoch"], "epochs": state["epoch"],
            "out_dir": str(out), "history": state["history"], "out_of_time": out_of_time}


def _stop_if_not_finite(what: str, value: float | torch.Tensor, step: int, epoch: int, cfg: "TrainConfig",
                        out: Path) -> None:
    """A NaN or infinite loss (or gradient) ends training with an error naming the step: nothing
    after it is saved, so last.pt and best/ stay those of the last good epoch."""
    value = float(value)
    if math.isfinite(value):
        return
    raise TrainError(f"training diverged at step {step} (epoch {epoch}): {what} is {value}. "
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
