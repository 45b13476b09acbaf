"""`captioner train` and `captioner evaluate`."""

from __future__ import annotations

import argparse
import os
import sys

from captioner.cli.args import (decoding_flags, decoding_overrides, device_options, model_arg, model_option, positive,
                                print_json)
from captioner.config import load_config
from captioner.decoding.settings import EVALUATION_BEAMS
from captioner.runtime.distributed import env_world

# --beam takes several sizes here; mentions are for captioning one's own photos, not for scoring a split
EVALUATE_DECODING = ["length_penalty", "no_repeat_ngram", "allow_unk", "concepts", "concept_threshold", "max_concepts",
                     "concept_ban", "concept_margin"]


def add_parsers(sub) -> None:
    s = sub.add_parser("train", help="train a captioning model", description="Overrides: key=value, e.g. "
                       "optim.lr=3e-4 optim.epochs=10 model.hidden_dim=256 data.corpus=... out_dir=...")
    s.add_argument("--config", default=None, help="YAML config (see configs/)")
    s.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    device_options(s, default=None, where=" (default: the config's device, cpu)")
    s.set_defaults(func=run_train)

    s = sub.add_parser("evaluate", help="score a model on a split (JSON + Markdown)")
    model_option(s, required=True)
    s.add_argument("--corpus", required=True)
    s.add_argument("--features", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--beam", type=beams, default=list(EVALUATION_BEAMS),
                   help=f"beam sizes, e.g. {','.join(map(str, EVALUATION_BEAMS))}")
    s.add_argument("--limit", type=positive, default=None, help="only the first N images")
    s.add_argument("--out", default=None, help="folder for metrics.json, metrics.md, captions.json")
    decoding_flags(s, EVALUATE_DECODING)
    device_options(s, captioning=True)
    s.set_defaults(func=run_evaluate)


def beams(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected beam sizes like 1,3,5, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("beam sizes must be >= 1")
    return sizes


def run_train(a: argparse.Namespace) -> int:
    from captioner.training.config import TrainConfig  # torch: not for `captioner --help`
    from captioner.training.loop import train

    cfg = load_config(TrainConfig, a.config, a.overrides)
    if a.device is not None:  # the command line wins over the config file
        cfg.device = a.device
    if a.precision is not None:
        cfg.precision = a.precision
    summary = train(cfg, resume=a.resume, on_start=warn_if_busy if env_world() == (0, 1) else None)
    if env_world()[0] == 0:  # under torchrun, rank 0 alone prints
        print_json({k: v for k, v in summary.items() if k != "history"})
    return 0


def run_evaluate(a: argparse.Namespace) -> int:
    from captioner.evaluation.evaluate import evaluate_model  # torch: not for `captioner --help`

    res = evaluate_model(model_arg(a), a.corpus, a.features, split=a.split, beams=a.beam, out=a.out,
                         limit=a.limit or 0, device=a.device, precision=a.precision,
                         **decoding_overrides(a, EVALUATE_DECODING))
    print(res["markdown"])
    for k, s in res["seconds"].items():
        print(f"beam {k}: {s} s")
    return 0


def set_wait_policy(command: str) -> None:
    """How OpenMP's idle threads wait, set before torch is imported unless the user has chosen
    (OMP_WAIT_POLICY). Spinning collapses when another process shares the cores (features went from
    2.9 to 5.8 images/s with it off, on 2 busy cores), so every command sleeps (PASSIVE) but
    ``train``: a training job is the long one that has the machine to itself, and spinning makes it
    1.2x faster then (bench/README.md); :func:`warn_if_busy` warns when the machine is already busy."""
    if "torch" not in sys.modules and command != "train":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def warn_if_busy() -> None:
    """Spinning threads lose many times over to another busy process (two spinning jobs on 2 cores:
    24x slower each); say so when training starts on a machine that is already loaded."""
    try:
        cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this system: nothing to say
        return
    if os.environ.get("OMP_WAIT_POLICY") is None and load >= 0.75 * cores:
        print(f"note: this machine is busy (load average {load:.1f} on {cores} cores). Training's threads spin while "
              "they wait, which is fastest alone but slows every job sharing the cores many times over; for jobs "
              "at the same time, start each with OMP_WAIT_POLICY=PASSIVE", file=sys.stderr)
