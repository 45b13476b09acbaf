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

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from captioner.config import deep_update, from_dict, save_yaml
from captioner.data.corpus import Corpus
from captioner.data.text import Vocab, write_text_atomic
from captioner.data.captions import CaptionData
from captioner.runtime.devices import DeviceError, autocast, check_precision, module_device, resolve_device
from captioner.runtime.distributed import Group, backend_for, env_world, process_group
from captioner.evaluation.evaluate import decode_images
from captioner.inference.captioner import DecodingSettings
from captioner.evaluation.metrics import compute_metrics
from captioner.encoders.features import FeatureStore
from captioner.models import build_decoder
from captioner.training.scheduled_sampling import ScheduledSamplingConfig, scheduled_sampling_forward
from captioner.training.scst import CiderD, ScstConfig, scst_loss
from captioner.inference.modeldir import MAX_CAPTION_WORDS, banned_ids, load_model_dir, save_model_dir


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
    max_minutes: float = 0.0  # wall-clock budget of the run, --resume included (0 = none): the epoch in
    #                           progress is cut short, validated and kept if best, leaving time for its validation
    schedule: str = "plateau"  # "plateau": decay on a validation plateau; "cosine": lr follows a cosine from lr
    #                            to 0 over optim.epochs, or over max_minutes when a budget is set
    ema: float = 0.0  # > 0: validate and keep an exponential moving average of the weights, updated after each
    #                   step as avg = ema * avg + (1 - ema) * weights (0.998 averages about the last 500 steps)


@dataclass
class TrainConfig:
    arch: str = "sat"
    model: dict[str, Any] = field(default_factory=dict)  # architecture config (see models/<arch>.py)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val_metric: str = "CIDEr-D"  # or BLEU-4
    val_beam: int = 1
    decoding: dict[str, Any] = field(default_factory=dict)  # the decoding defaults best/ records (beam 3 unless
    #   set), e.g. decoding.length_penalty=1.0; validation decodes with them at beam val_beam
    init_from: str = ""  # a model directory to start from (staged training), instead of random weights
    objective: str = "xe"  # "xe": cross-entropy on the references; "scst": self-critical on CIDEr-D (needs init_from)
    label_smoothing: float = 0.0  # xe: this much of each target word's probability spread over the vocabulary
    scst: ScstConfig = field(default_factory=ScstConfig)
    scheduled_sampling: ScheduledSamplingConfig = field(default_factory=ScheduledSamplingConfig)  # xe only
    seed: int = 0
    threads: int = 0  # torch threads; 0 = leave the default
    out_dir: str = "runs/sat"
    progress: bool = True
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (a GPU when there is one); `captioner train --device`
    precision: str = "fp32"  # or bf16: forward and loss under bfloat16 autocast
    then: list[dict[str, Any]] = field(default_factory=list)  # later stages of the same run, each from the best/
    #   of the one before, e.g. [{name: scst, objective: scst, optim: {lr: 2.0e-5, epochs: 3}}] (stage_configs)


def caption_loss(out, tokens: torch.Tensor, lengths: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, cross-entropy): the cross-entropy on real target words only (mask from lengths), with
    ``label_smoothing`` of the target's probability spread evenly over the vocabulary (Szegedy et al.
    2016), plus the model's regulariser."""
    T = out.logits.shape[1]
    targets = tokens[:, 1:T + 1]
    mask = torch.arange(T, device=lengths.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    ce = F.cross_entropy(out.logits[mask], targets[mask], label_smoothing=label_smoothing)
    total = ce + (out.extra_loss if out.extra_loss is not None else 0.0)
    return total, ce


# ----------------------------------------------------------------------------- the training loop


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
    for k, stage in enumerate(stages):  # every stage's mistakes before the first one trains
        try:
            check_config(stage, world, init_from_exists=k == 0)
            if stage.data != stages[0].data:  # a stage on other data: its files must be there
                _check_data_paths(stage.data)
        except ValueError as e:
            raise (TrainError(f"then[{k - 1}] ({cfg.then[k - 1]['name']}): {e}") if k else e) from None
        if not resume and (Path(stage.out_dir) / "last.pt").exists():
            raise TrainError(f"{stage.out_dir} already holds a training run (last.pt), and stage {k + 1} of this "
                             "run would write there; use --resume to continue the run, or another out_dir")
    done = []
    # under torchrun one process group for all the stages: set up again after a teardown, a group would
    # meet in the same keys of torchrun's store as the last one, and a rank could read the old addresses
    with _process_group(cfg):
        for k, stage in enumerate(stages):
            if rank == 0:
                print(f"stage {k + 1} of {len(stages)}: {stage.out_dir}"
                      + (f" (from {stage.init_from})" if stage.init_from else ""), flush=True)
            if k:
                _same_start_model(stage, rank)
            summary = _train_stage(stage, resume, stop_after_steps, on_start if k == 0 else None)
            if "stopped_at_step" in summary:
                return summary
            done.append({key: summary[key] for key in ("out_dir", "best", "best_epoch", "epochs", "out_of_time")})
    return {**summary, "stages": done}


STAGE_KEEPS = ("arch", "data", "threads", "device", "precision", "progress")  # what a stage takes from the run
STAGE_SETS = ("init_from", "out_dir", "model", "then", "arch", "threads", "device", "precision", "progress")


def stage_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """The stages of a run: ``cfg`` itself (without ``then``), then one per entry of ``cfg.then``, each
    trained from the best/ of the stage before it, into ``{out_dir}-{name}``. A stage takes the run's
    arch, data (an entry may change it) and machine settings (threads, device, precision, progress);
    every other setting is its default unless the entry sets it, exactly as if the stage were its own
    config file with ``init_from`` pointing at the previous stage."""
    stages = [dataclasses.replace(cfg, then=[])]
    kept = {k: v for k, v in asdict(stages[0]).items() if k in STAGE_KEEPS}
    out = Path(cfg.out_dir)
    if cfg.then and out.name in ("", ".", ".."):
        raise TrainError(f"out_dir={cfg.out_dir!r}: a run with stages (then) needs an out_dir with a name, e.g. "
                         "runs/sat; its later stages go beside it, into runs/sat-<name>")
    names = set()
    for i, entry in enumerate(cfg.then):
        where = f"then[{i}]"
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise TrainError(f"{where}: a stage needs a name (letters, digits, - _ .), e.g. `- name: scst`; "
                             f"it trains into out_dir-name ({cfg.out_dir}-scst)")
        if name in names:
            raise TrainError(f"{where}: a second stage named {name!r}; each stage needs its own name (its out_dir)")
        names.add(name)
        given = {k: v for k, v in entry.items() if k != "name"}
        fixed = sorted(set(given) & set(STAGE_SETS))
        if fixed:
            raise TrainError(f"{where} ({name}).{fixed[0]}: set by the run, not a stage: a stage starts from the "
                             "best/ of the one before (its architecture and sizes), trains into out_dir-name, "
                             "and runs where the run runs")
        merged = copy.deepcopy(kept)
        deep_update(merged, given)
        merged.update(init_from=str(Path(stages[-1].out_dir) / "best"),
                      out_dir=str(out.with_name(f"{out.name}-{name}")))
        stages.append(from_dict(TrainConfig, merged, where=f"{where} ({name})"))
    return stages


def _check_data_paths(data: DataConfig) -> None:
    for what, path, ok in (("data.corpus", data.corpus, Path.is_file), ("data.features", data.features, Path.is_dir),
                           ("data.vocab", data.vocab, Path.is_file)):
        if path and not ok(Path(path)):
            raise TrainError(f"{what}={path}: not found")


def _same_start_model(stage: TrainConfig, rank: int) -> None:
    """A later stage records which best/ it started from (a hash of its weights); resumed after the stage
    before it trained on (``--resume optim.epochs=30``) and wrote a new best/, it would go on from the
    old one, so that is refused."""
    record = Path(stage.out_dir) / "started_from.json"
    digest = hashlib.sha256((Path(stage.init_from) / "model.safetensors").read_bytes()).hexdigest()
    if record.exists() and (Path(stage.out_dir) / "last.pt").exists():
        if json.loads(record.read_text()).get("sha256") != digest:
            raise TrainError(f"{stage.out_dir} started from an earlier {stage.init_from} than the one there now "
                             "(the stage before it has trained on since and found a better model): remove "
                             f"{stage.out_dir} to train this stage again from the new one")
    elif rank == 0:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps({"init_from": stage.init_from, "sha256": digest}))


def _train_stage(cfg: TrainConfig, resume: bool, stop_after_steps: int | None,
                 on_start: Callable[[], None] | None = None) -> dict:
    """One training run: ``out_dir`` from ``init_from`` or random weights."""
    with _process_group(cfg) as group, _warnings_on_rank0_only(group):
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


@dataclass
class Run:
    """What a training run holds between epochs (made by :func:`setup`)."""

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
    budget: "Budget | None" = None  # made by start()
    ema: Any = None  # optim.ema > 0: torch.optim.swa_utils.AveragedModel of the decoder (validated, kept as best/)
    steps_run: int = 0  # steps in this process (stop_after_steps)

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


def setup(cfg: TrainConfig, group: Group, resume: bool) -> Run:
    """Everything before the first step: config checks, data, model, optimizer and, with ``resume``,
    the state of ``last.pt``. Every rank runs it (``train`` makes a failure on one stop them all);
    nothing is written here."""
    check_config(cfg, group.world)
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

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP copies rank 0's anyway)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    decoder = _build_decoder(cfg, vocab, vocab_path, enc, group)
    decoder.to(device)
    if group.rank:  # dropout and sampling draw other numbers on each rank
        _seed_rank(cfg.seed, group.rank)
    opt = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=cfg.optim.lr,
                           weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.optim.lr_decay,
                                                       patience=cfg.optim.lr_patience, threshold=0.0)
    ema = _moving_average(decoder, cfg.optim.ema) if cfg.optim.ema else None
    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": [], "step": 0}
    resumed = resume and ckpt.exists()
    if resumed:
        state = _load_checkpoint(ckpt, cfg, group, decoder, opt, sched, vocab, vocab_path, ema)
    info = {"encoder": enc, "decoding": _decoding(cfg).to_dict(),
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
    group.agree(lambda: _same_start(where, run.out) if group.rank == 0 else None)
    if group.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        run.model = DistributedDataParallel(run.model)
    group.agree(lambda: _first_writes(run) if group.rank == 0 else None)
    if run.stopped_early:
        run.say(f"--resume: {run.out} had already stopped early at epoch {state['epoch']}")
    elif cfg.init_from and state["epoch"] == 0:
        # the starting point is the score to beat: stage 2 must not ship something worse than stage 1
        scores, _, _ = validate(run)
        state.update(best=scores[cfg.val_metric], best_epoch=0)
        run.sched.best = scores[cfg.val_metric]
        group.agree(lambda: _save_best(run, scores, 0) if group.rank == 0 else None)
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
    from tqdm import tqdm

    cfg = run.cfg
    rng = np.random.default_rng([cfg.seed, epoch])  # the data order depends only on (seed, epoch): on every rank
    if run.scst:  # images, not captions: each image's samples are scored against all its references
        order = torch.from_numpy(rng.permutation(len(run.train_data.images)))
        batches = list(order.split(cfg.scst.images_per_batch))
    else:
        batches = run.train_data.batches(cfg.optim.batch_size, rng)
    ss_prob = 0.0 if run.scst else cfg.scheduled_sampling.prob(epoch)
    run.model.train()
    t0 = time.perf_counter()
    tot, sums, seen = 0.0, {}, 0
    bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.optim.epochs}", unit="batch",
               disable=not cfg.progress or run.group.rank != 0, dynamic_ncols=True)
    for b, idx in enumerate(bar):
        used = run.budget.check()
        if run.budget.out:
            break  # validate what this epoch has learnt so far, then stop
        if cfg.optim.schedule == "cosine":
            frac = used if run.budget.seconds else (epoch - 1 + b / len(batches)) / cfg.optim.epochs
            for g in run.opt.param_groups:
                g["lr"] = cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
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


class BatchLoss(torch.nn.Module):
    """This rank's part of a batch's training loss: summed over the ranks, the loss one process
    computes on the whole batch (alone, that loss). One module for every objective, so that
    DistributedDataParallel sees every pass that makes gradients (SCST and scheduled sampling run
    the decoder step by step, not through its forward)."""

    def __init__(self, decoder: torch.nn.Module, data: CaptionData, vocab: Vocab, cfg: TrainConfig, group: Group):
        super().__init__()
        self.decoder, self.data, self.vocab, self.cfg = decoder, data, vocab, cfg
        self.rank, self.world = group.rank, group.world
        self.banned = banned_ids(vocab, False)  # <unk> is never output, in SCST's samples as in deployment
        # SCST's reward: document frequencies from all the training references, the same on every rank
        self.cider = (CiderD({im: [list(t) for t in toks] for im, toks in data.ref_tokens.items()})
                      if cfg.objective == "scst" else None)

    def forward(self, batch: np.ndarray, ss_prob: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, statistics) of this rank's share of ``batch``: every world-th caption from the rank-th
        (a batch is sorted longest first, and so is each share)."""
        mine = batch[self.rank::self.world]
        device, precision = module_device(self.decoder), self.cfg.precision
        if len(mine) == 0:  # a batch with fewer captions than ranks: none here, but every weight takes part
            zero = sum(p.sum() for p in self.decoder.parameters() if p.requires_grad) * 0.0
            return zero, ({"reward": 0.0, "baseline": 0.0} if self.cider else {"ce": 0.0})
        share = len(mine) / len(batch)
        if self.cider is not None:
            images = [self.data.images[i] for i in mine.tolist()]
            with autocast(device, precision):
                loss, reward, baseline = scst_loss(self.decoder, self.data.features(mine).to(device), images,
                                                   self.cider, self.vocab.itos, start_id=self.vocab.start_id,
                                                   end_id=self.vocab.end_id, cfg=self.cfg.scst, banned=self.banned)
            return loss * share, {"reward": reward * share, "baseline": baseline * share}
        feats, tokens, lengths = (t.to(device) for t in self.data.batch(mine))
        with autocast(device, precision):
            if ss_prob > 0:
                out = scheduled_sampling_forward(self.decoder, feats, tokens, lengths, ss_prob)
            else:
                out = self.decoder(feats, tokens, lengths)
            total, ce = caption_loss(out, tokens, lengths, self.cfg.label_smoothing)
        # the cross-entropy is a mean over the batch's words, the regulariser one over its captions: each
        # share weighs by its part of them (alone both parts are 1 and the loss is the batch's)
        words = int((self.data.lengths[mine] - 1).sum()) / int((self.data.lengths[batch] - 1).sum())
        loss = total * share + (ce * (words - share) if words != share else 0.0)
        return loss, {"ce": ce.item() * words}


def validate(run: Run) -> tuple[dict, dict[str, str], float]:
    """Decode the validation images (under torchrun each rank a share) and score them on rank 0; every
    rank gets rank 0's scores, which drive the lr, early stopping, the best model and the budget.
    Returns (scores, caption per image, seconds)."""
    cfg, group, data = run.cfg, run.group, run.val_data
    t0 = time.perf_counter()
    if run.ema is not None:  # batch norm's running statistics come from each rank's share: rank 0's for all
        group.broadcast_tensors(list(run.ema.module.buffers()))
    n = len(data.images) if not cfg.data.val_images else min(cfg.data.val_images, len(data.images))
    settings = _val_decoding(cfg)
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
        if cfg.optim.restore_best and run.opt.param_groups[0]["lr"] < lr_used and _restore_best(run):
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


def save_checkpoint(run: Run, best_scores: dict | None) -> None:
    """Rank 0 writes best/ (when ``best_scores``: this epoch is the best), last.pt and the logs; a failed
    write stops every rank. last.pt holds every rank's random state, for an exact --resume."""
    rng = run.group.gather(_rng_state())
    if run.group.world > 1 and len(set(run.group.gather(_weights_checksum(run.decoder)))) > 1:  # a bug
        raise RuntimeError(f"the ranks' weights differ after epoch {run.state['epoch']}: they trained apart")

    def write() -> None:
        if best_scores is not None:
            _save_best(run, best_scores, run.state["epoch"])
        _atomic_save({"model": run.decoder.state_dict(), "optimizer": run.opt.state_dict(),
                      **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
                      "scheduler": run.sched.state_dict(), "rng": rng[0],
                      **({"rng_ranks": rng} if len(rng) > 1 else {}),
                      "state": json.dumps(run.state), "config": json.dumps(asdict(run.cfg)),
                      "vocab": json.dumps(run.vocab.itos)}, run.out / "last.pt")
        _write_logs(run.state["history"], run.out, run.cfg.val_metric)

    run.group.agree(write if run.group.rank == 0 else lambda: None)


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


# ----------------------------------------------------------------------------- setup and checkpoint details


def _process_group(cfg: TrainConfig):
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
def _warnings_on_rank0_only(group: Group):
    """Ranks other than 0 print nothing but errors (their warnings would repeat rank 0's)."""
    with warnings.catch_warnings():
        if group.rank:
            warnings.simplefilter("ignore")
        yield


def _seed_rank(seed: int, rank: int) -> None:
    """A random stream of its own for a rank other than 0 (rank 0 keeps the single-process one)."""
    s = np.random.SeedSequence([seed, rank]).generate_state(2)
    torch.manual_seed(int(s[0]))
    np.random.seed(int(s[1]))
    random.seed(int(s[1]))


def _build_decoder(cfg: TrainConfig, vocab: Vocab, vocab_path: str, enc: dict, group: Group) -> torch.nn.Module:
    """Random weights for ``cfg.arch``, or those of ``init_from`` (checked to fit the vocabulary and features)."""
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
        return decoder.train()
    model_cfg = {**cfg.model, "vocab_size": len(vocab), "feature_dim": enc["channels"]}
    decoder = build_decoder(cfg.arch, model_cfg, vocab=vocab)
    if decoder.word_vector_report is not None and group.rank == 0:
        print(decoder.word_vector_report.summary(), flush=True)
    return decoder


def _load_checkpoint(ckpt: Path, cfg: TrainConfig, group: Group, decoder, opt, sched, vocab: Vocab,
                     vocab_path: str, ema=None) -> dict:
    """--resume: weights, optimizer, scheduler and this rank's random state from last.pt; returns the state."""
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    # a setting added since the checkpoint was written counts as its default
    changed = _config_changes(_over(asdict(TrainConfig()), json.loads(c["config"])), asdict(cfg)) if "config" in c else []
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


def _weights_checksum(decoder) -> float:
    """DDP keeps every rank's weights identical (the same averaged gradients, the same steps)."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in decoder.parameters()))


def _same_start(where: list[tuple[int, int]], out: Path) -> None:
    if len(set(where)) > 1:
        raise TrainError(f"the ranks would start from different points ((epoch, step) per rank: {where}): they do "
                         f"not all see the same {out}/last.pt. Put out_dir on a filesystem every node sees")


def _first_writes(run: Run) -> None:
    """Rank 0, before the first epoch: the out_dir, config.yaml, and on --resume the logs (a kill may have
    come between the checkpoint and the logs)."""
    run.out.mkdir(parents=True, exist_ok=True)
    if run.resumed:
        _write_logs(run.state["history"], run.out, run.cfg.val_metric)
    if not run.stopped_early:
        save_yaml(run.cfg, run.out / "config.yaml")


def _save_best(run: Run, scores: dict, epoch: int) -> None:
    save_model_dir(run.out / "best", run.kept, run.vocab, {**run.info, "metrics": {"val": {
        "split": run.cfg.data.val_split, "beam": run.cfg.val_beam, "epoch": epoch, **scores}}})


def _restore_best(run: Run) -> bool:
    """Back to best/'s weights: rank 0 reads them, every rank gets them. False when there is no best/."""
    best = run.out / "best"
    found = run.group.on_rank0(lambda: best.is_dir() and _restore_weights(run.decoder, best))
    if found:
        run.group.broadcast_tensors(run.decoder.state_dict().values())
        if run.ema is not None:  # the average starts again from the best weights
            run.ema.module.load_state_dict(run.decoder.state_dict())
    return found


def _moving_average(decoder: torch.nn.Module, decay: float):
    """optim.ema: torch's AveragedModel keeping avg = decay * avg + (1 - decay) * weights (buffers too);
    its first update copies the weights."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(decoder, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.module.eval()
    return ema


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


def _restore_weights(decoder, model_dir: Path) -> bool:
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    decoder.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    return True


ENCODER_KEYS = ("name", "image_size", "grid", "resize", "mean", "std")
RESUMABLE_CHANGES = {"optim.epochs", "optim.max_minutes", "progress", "threads", "device"}


def _over(defaults: dict, given: dict) -> dict:
    """``given`` with the keys it lacks taken from ``defaults`` (nested dicts merged; not ``model``)."""
    out = dict(defaults)
    for k, v in given.items():
        out[k] = _over(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model" else v
    return out


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


def _decoding(cfg: TrainConfig) -> DecodingSettings:
    """The decoding defaults of the trained model: beam 3, captions up to data.max_len words (at most the
    longest a model may decode), and ``decoding``."""
    return DecodingSettings(**{"beam_size": 3, "max_len": min(cfg.data.max_len, MAX_CAPTION_WORDS),
                               **cfg.decoding}).checked()


def _val_decoding(cfg: TrainConfig) -> DecodingSettings:
    """How validation decodes: the model's decoding defaults at beam ``val_beam``."""
    return _decoding(cfg).replace(beam_size=cfg.val_beam, n_best=1)


def check_config(cfg: TrainConfig, world: int = 1, *, init_from_exists: bool = True) -> None:
    """Catch config mistakes before any work is done (not after the first epoch). ``world``: the
    number of processes under torchrun, which share every batch; ``init_from_exists=False`` for a
    later stage, whose starting model the stage before it will write."""
    from captioner.evaluation.metrics import METRIC_NAMES, java_available
    from captioner.models import get_architecture

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
    if cfg.optim.batch_size < world and cfg.objective == "xe":
        raise TrainError(f"optim.batch_size={cfg.optim.batch_size}: the global batch, shared by the {world} "
                         f"processes torchrun started, so at least {world} (each takes batch_size / {world} captions)")
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
    if not (math.isfinite(cfg.label_smoothing) and 0 <= cfg.label_smoothing < 1):
        raise TrainError(f"label_smoothing={cfg.label_smoothing}: must be from 0 (off) to below 1 (e.g. 0.1)")
    if not (math.isfinite(cfg.optim.ema) and 0 <= cfg.optim.ema < 1):
        raise TrainError(f"optim.ema={cfg.optim.ema}: must be from 0 (off) to below 1 (e.g. 0.998)")
    if cfg.optim.schedule not in ("plateau", "cosine"):
        raise TrainError(f"optim.schedule={cfg.optim.schedule!r}: use plateau (decay when validation stops "
                         "improving) or cosine (from optim.lr to 0 over the epochs, or over optim.max_minutes)")
    known = {f.name for f in dataclasses.fields(DecodingSettings)} - {"sample", "num_captions", "temperature", "top_k",
                                                                       "top_p", "seed", "n_best"}
    unknown = sorted(set(cfg.decoding) - known)
    if unknown:
        raise TrainError(f"decoding.{unknown[0]}: not a decoding default a model records; use "
                         f"{', '.join('decoding.' + k for k in sorted(known))}")
    try:
        _decoding(cfg)
    except (TypeError, ValueError) as e:
        raise TrainError(f"decoding: {e}") from None
    try:
        _val_decoding(cfg)
    except ValueError as e:
        raise TrainError(f"val_beam={cfg.val_beam}: {e}") from None
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
        if cfg.scst.images_per_batch < world:
            raise TrainError(f"scst.images_per_batch={cfg.scst.images_per_batch}: the global batch, shared by the "
                             f"{world} processes torchrun started, so at least {world}")
    if cfg.objective == "scst" and cfg.label_smoothing:
        raise TrainError("label_smoothing smooths the cross-entropy's targets (objective=xe); SCST has none")
    if cfg.init_from and cfg.model:
        raise TrainError("init_from takes the architecture sizes from that model directory; leave model empty")
    if cfg.init_from and init_from_exists:
        from captioner.inference.modeldir import resolve_model_path

        resolve_model_path(cfg.init_from)  # a clear error for a wrong path, before any work


class TrainError(ValueError):
    pass
