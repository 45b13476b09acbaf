"""The training config: every setting of a run, its default and its check, in one place.

Each section validates itself (``checked()``: types, bounds and the settings that go together, raising
:class:`TrainError` with the message the user reads); :func:`check_run` adds what depends on where the
run runs (the device, Java for METEOR, the number of torchrun processes, init_from on disk). Both run
before any work is done, not after the first epoch.

How validation decodes and what best/ records as its decoding defaults come from
:class:`captioner.decoding.settings.DecodingSettings`; training defines no decoding default of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from captioner.checks import is_int, is_number, shown
from captioner.decoding.settings import STORED, DecodingSettings
from captioner.evaluation.metrics import METRIC_NAMES, java_available
from captioner.inference.modeldir import resolve_model_path
from captioner.models import get_architecture
from captioner.runtime.devices import check_precision, resolve_device
from captioner.training.warmup import default_warmup


MAX_WARMUP = 10_000_000  # optimizer steps of warm-up at most (a config's typo, not a schedule, beyond it)


class TrainError(ValueError):
    pass


@dataclass
class DataConfig:
    """``data``: the corpus, its vocabulary and feature store, and which captions train and validate."""

    corpus: str = ""  # corpus.json from `captioner prepare`
    vocab: str = ""  # vocab.json (default: next to the corpus)
    features: str = ""  # feature store directory from `captioner features`
    max_len: int = 30  # captions longer than this many words are truncated (the <end> kept)
    train_split: str = "train"
    val_split: str = "val"
    val_images: int = 0  # 0 = all validation images

    def checked(self) -> "DataConfig":
        if not self.corpus or not self.features:
            raise TrainError("set data.corpus (corpus.json from `captioner prepare`) and data.features "
                             "(a store from `captioner features`), in the YAML config or as data.corpus=...")
        if self.val_images < 0:
            raise TrainError(f"data.val_images={self.val_images}: must be >= 0")
        return self


@dataclass
class OptimConfig:
    """``optim``: the optimizer, the learning-rate schedule, early stopping and the time budget."""

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
    warmup: int | None = None  # the lr rises linearly over this many optimizer steps, from lr/warmup to the
    #   schedule's lr (training/warmup.py); 0 = none; unset (null) = the architecture's default from random
    #   weights (transformer: TransformerDecoder.default_warmup, the others 0), 0 from init_from. The config
    #   a run records (config.yaml, best/config.json) holds the number used

    def checked(self, default_warmup: int = 0) -> "OptimConfig":
        """The checks, and an unset ``warmup`` set to ``default_warmup`` (:func:`TrainConfig.checked` passes the
        architecture's)."""
        if self.warmup is None:
            self.warmup = default_warmup
        if not (is_int(self.warmup) and 0 <= self.warmup <= MAX_WARMUP):
            raise TrainError(f"optim.warmup={shown(self.warmup)}: must be a whole number of optimizer steps from 0 "
                             f"(no warm-up) to {MAX_WARMUP}, or null for the architecture's default (e.g. 1000; an "
                             f"epoch is about training captions / optim.batch_size steps)")
        if self.batch_size < 1 or self.epochs < 1:
            raise TrainError("optim.batch_size and optim.epochs must be >= 1")
        if not (is_number(self.lr) and self.lr > 0):
            raise TrainError(f"optim.lr={self.lr}: must be a finite number > 0 (e.g. 4e-4)")
        if not (is_number(self.grad_clip) and self.grad_clip >= 0):
            raise TrainError(f"optim.grad_clip={self.grad_clip}: must be a finite number >= 0 (the largest gradient "
                             "norm; 0 turns clipping off)")
        if not (is_number(self.weight_decay) and self.weight_decay >= 0):
            raise TrainError(f"optim.weight_decay={self.weight_decay}: must be a finite number >= 0")
        for name, value in (("optim.lr_patience", self.lr_patience), ("optim.early_stop", self.early_stop)):
            if value < 0:
                raise TrainError(f"{name}={value}: must be >= 0")
        if not 0 < self.lr_decay < 1:
            raise TrainError(f"optim.lr_decay={self.lr_decay}: must be between 0 and 1 (exclusive); "
                             "for no decay set optim.lr_patience to a number larger than optim.epochs")
        if not (is_number(self.max_minutes) and 0 <= self.max_minutes <= 10_000_000):
            raise TrainError(f"optim.max_minutes={self.max_minutes}: must be a number of minutes >= 0 (0 = no budget)")
        if not (is_number(self.ema) and 0 <= self.ema < 1):
            raise TrainError(f"optim.ema={self.ema}: must be from 0 (off) to below 1 (e.g. 0.998)")
        if self.schedule not in ("plateau", "cosine"):
            raise TrainError(f"optim.schedule={shown(self.schedule)}: use plateau (decay when validation stops "
                             "improving) or cosine (from optim.lr to 0 over the epochs, or over optim.max_minutes)")
        return self


@dataclass
class ScstConfig:
    """objective=scst (:mod:`captioner.training.scst`)."""

    samples: int = 5  # K captions drawn per image
    baseline: str = "mean"  # "mean" (of the other samples) or "greedy"
    max_len: int = 20  # words per sampled caption
    images_per_batch: int = 50
    dropout: bool = False  # sample with the decoder's dropout on (False: the network that will be deployed)

    def checked(self) -> "ScstConfig":
        if self.baseline not in ("mean", "greedy"):
            raise TrainError(f"scst.baseline={shown(self.baseline)}: use mean (of the other samples) or greedy")
        if not 2 <= self.samples <= 100 or not 1 <= self.max_len <= 100 or self.images_per_batch < 1:
            raise TrainError("scst.samples must be 2..100, scst.max_len 1..100 and scst.images_per_batch >= 1")
        return self


@dataclass
class ScheduledSamplingConfig:
    """objective=xe with the model's own words mixed in (:mod:`captioner.training.scheduled_sampling`)."""

    max_prob: float = 0.0  # 0 = off (plain teacher forcing)
    start_epoch: int = 1
    increase_every: int = 2
    increase_prob: float = 0.05

    def prob(self, epoch: int) -> float:
        if self.max_prob <= 0 or epoch < self.start_epoch:
            return 0.0
        steps = (epoch - self.start_epoch) // self.increase_every + 1
        return min(self.max_prob, steps * self.increase_prob)

    def checked(self) -> "ScheduledSamplingConfig":
        if not (0 <= self.max_prob <= 1 and 0 <= self.increase_prob <= 1 and self.increase_every >= 1
                and self.start_epoch >= 1):
            raise TrainError("scheduled_sampling: max_prob and increase_prob must be from 0 to 1, increase_every and "
                             "start_epoch >= 1")
        return self


@dataclass
class EncoderConfig:
    """``encoder``: fine-tuning the encoder's last units with the decoder (system S5's second stage). It trains on a
    trunk store (`captioner features --cut N`: the maps before the last N units), running those units each step."""

    train_blocks: int = 0  # train the encoder's last N units (1 = its final 1x1 convolution, 2 = that and the last
    #                        block, ...; at most the store's cut); 0 = the encoder stays as it is
    lr: float = 1e-4  # their learning rate (the decoder's is optim.lr); schedules and warm-up scale both alike
    batchnorm: str = "frozen"  # "frozen": BatchNorm statistics and scales stay as ImageNet left them; "train": they
    #                            learn, with batch statistics in training mode

    def checked(self) -> "EncoderConfig":
        if not (is_int(self.train_blocks) and 0 <= self.train_blocks <= MAX_TRAIN_BLOCKS):
            raise TrainError(f"encoder.train_blocks={shown(self.train_blocks)}: a whole number of the encoder's last "
                             f"units to train, from 0 (none) to {MAX_TRAIN_BLOCKS}")
        if not (is_number(self.lr) and self.lr > 0):
            raise TrainError(f"encoder.lr={shown(self.lr)}: must be a finite number > 0 (e.g. 1e-4)")
        if self.batchnorm not in ("frozen", "train"):
            raise TrainError(f"encoder.batchnorm={shown(self.batchnorm)}: use frozen (ImageNet's statistics) or train")
        return self


MAX_TRAIN_BLOCKS = 64


@dataclass
class TrainConfig:
    """A training run: what a YAML config file (plus ``key=value`` overrides) sets."""

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
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # fine-tuning the encoder's last units
    seed: int = 0
    threads: int = 0  # torch threads; 0 = leave the default
    out_dir: str = "runs/sat"
    progress: bool = True
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (a GPU when there is one); `captioner train --device`
    precision: str = "fp32"  # or bf16: forward and loss under bfloat16 autocast; auto: bf16 on a CPU with bfloat16
    # instructions (AVX512-BF16, AMX), else fp32 (runtime/devices.py, split_precision)
    then: list[dict[str, Any]] = field(default_factory=list)  # later stages of the same run, each from the best/
    #   of the one before, e.g. [{name: scst, objective: scst, optim: {lr: 2.0e-5, epochs: 3}}] (stage_configs)

    def decoding_settings(self) -> DecodingSettings:
        """The decoding defaults of the trained model (best/ records them): ``decoding``, with captions up to
        data.max_len words (at most the longest a model may decode)."""
        return DecodingSettings.for_training(self.decoding, self.data.max_len)

    def val_decoding(self) -> DecodingSettings:
        """How validation decodes: the model's decoding defaults at beam ``val_beam``."""
        return self.decoding_settings().replace(beam_size=self.val_beam, n_best=1)

    def checked(self) -> "TrainConfig":
        """Every section's checks, then the settings that must go together (the machine aside: :func:`check_run`)."""
        self.data.checked()
        if self.val_metric not in METRIC_NAMES or self.val_metric == "SPICE":
            raise TrainError(f"val_metric={shown(self.val_metric)}: use one of BLEU-1..4, METEOR, ROUGE-L, CIDEr-D")
        get_architecture(self.arch)  # raises with the list of architectures
        self.optim.checked(default_warmup(self.arch, self.init_from))  # records the warm-up an unset one gets
        if self.val_beam < 1 or self.data.max_len < 1:
            raise TrainError("val_beam and data.max_len must be >= 1")
        if not 0 <= self.threads <= 1024:
            raise TrainError(f"threads={self.threads}: must be from 1 to 1024 torch threads, or 0 to leave the default")
        if not (is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise TrainError(f"label_smoothing={self.label_smoothing}: must be from 0 (off) to below 1 (e.g. 0.1)")
        self._check_decoding()
        self.scheduled_sampling.checked()
        self.encoder.checked()
        self._check_objective()
        return self

    def _check_decoding(self) -> None:
        unknown = sorted(set(self.decoding) - set(STORED))
        if unknown:
            raise TrainError(f"decoding.{unknown[0]}: not a decoding default a model records; use "
                             f"{', '.join('decoding.' + k for k in sorted(STORED))}")
        try:
            self.decoding_settings()
        except (TypeError, ValueError) as e:
            raise TrainError(f"decoding: {e}") from None
        try:
            self.val_decoding()
        except ValueError as e:
            raise TrainError(f"val_beam={self.val_beam}: {e}") from None

    def _check_objective(self) -> None:
        if self.objective not in ("xe", "scst"):
            raise TrainError(f"objective={shown(self.objective)}: use xe (cross-entropy) or scst (self-critical, "
                             "after xe)")
        if self.objective == "scst":
            if not self.init_from:
                raise TrainError("objective=scst fine-tunes a trained model: set init_from=DIR (e.g. the best/ of a "
                                 "cross-entropy run); from random weights its samples earn no reward to learn from")
            self.scst.checked()
        if self.objective == "scst" and self.label_smoothing:
            raise TrainError("label_smoothing smooths the cross-entropy's targets (objective=xe); SCST has none")
        if self.init_from and self.model:
            raise TrainError("init_from takes the architecture sizes from that model directory; leave model empty")


def check_run(cfg: TrainConfig, world: int = 1, *, init_from_exists: bool = True) -> None:
    """Catch config mistakes before any work is done (not after the first epoch): ``cfg.checked()``, then
    what depends on the machine. ``world``: the number of processes under torchrun, which share every
    batch; ``init_from_exists=False`` for a later stage, whose starting model the stage before it will write."""
    cfg.checked()
    if cfg.val_metric == "METEOR" and not java_available()[0]:
        raise TrainError("val_metric=METEOR needs Java; use CIDEr-D or BLEU-4")
    check_precision(cfg.precision, resolve_device(cfg.device), allow_auto=True)  # an absent GPU, an unknown name
    if cfg.optim.batch_size < world and cfg.objective == "xe":
        raise TrainError(f"optim.batch_size={cfg.optim.batch_size}: the global batch, shared by the {world} "
                         f"processes torchrun started, so at least {world} (each takes batch_size / {world} captions)")
    if cfg.objective == "scst" and cfg.scst.images_per_batch < world:
        raise TrainError(f"scst.images_per_batch={cfg.scst.images_per_batch}: the global batch, shared by the "
                         f"{world} processes torchrun started, so at least {world}")
    if cfg.init_from and init_from_exists:
        resolve_model_path(cfg.init_from)  # a clear error for a wrong path, before any work
