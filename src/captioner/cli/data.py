"""The data commands: ``prepare`` (a dataset into corpus.json + vocab.json + report.json), ``features``
(cache encoder grids of images) and ``synth`` (the synthetic shapes dataset). They parse and print; the
work is :func:`captioner.data.prepare.prepare_corpus`, :func:`captioner.encoders.extract.extract_features`
and :func:`captioner.data.synthetic.make_shapes_dataset`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from captioner.cli.args import device_options, positive, print_json, ratios, runtime_options, workers
from captioner.data.corpus import DEFAULT_RATIOS
from captioner.data.features import images_to_encode
from captioner.data.images import DEFAULT_MAX_PIXELS
from captioner.data.prepare import prepare_corpus
from captioner.data.readers import FORMATS
from captioner.data.synthetic import LANGUAGES, make_shapes_dataset
from captioner.runtime.distributed import env_world
from captioner.runtime.workers import MAX_WORKERS

COMMANDS = ("prepare", "features", "synth")


def cmd_prepare(a: argparse.Namespace) -> int:
    p = prepare_corpus(a.format, a.source, a.extra, images=a.images, out=a.out, overwrite=a.overwrite,
                       strict=a.strict, dedupe=a.dedupe, ratios=a.split_ratios, seed=a.split_seed,
                       restval=a.restval, min_freq=a.min_freq, max_words=a.max_words, max_len=a.max_len)
    out = p.out
    print(p.corpus.report.summary())
    print(f"vocabulary: {len(p.vocab)} entries (min_freq={a.min_freq}, max_words={a.max_words})")
    print(f"train captions longer than {a.max_len} words (truncated in training): {p.lengths['truncated']}"
          f" of {p.lengths['captions']}")
    print(f"wrote {out / 'corpus.json'}, {out / 'vocab.json'}, {out / 'report.json'}")
    for warning in p.warnings:
        print(f"warning: vocabulary: {warning}", file=sys.stderr)
    skipped = p.corpus.report.skipped_count()
    if skipped:
        print(f"{skipped} entr{'y was' if skipped == 1 else 'ies were'} skipped (listed above and in "
              f"{out / 'report.json'}); --strict makes that an error", file=sys.stderr)
        return 1
    return 0


def cmd_features(a: argparse.Namespace) -> int:
    root, names = images_to_encode(a.corpus, a.images, a.splits)
    summary = _without_torch(a, root, names)  # with ONNX Runtime, once a run has left its hint
    if summary is None:
        # imports torch: only here, after main() has set OMP_WAIT_POLICY, and never for --help
        from captioner.encoders.extract import extract_features

        summary = extract_features(root, names, a.out, encoder=a.encoder, resize=a.resize, image_size=a.image_size,
                                   batch_size=a.batch_size, workers=a.workers, max_pixels=a.max_pixels,
                                   overwrite=a.overwrite, progress=not a.quiet, device=a.device,
                                   precision=a.precision, grid=a.grid, cut=a.cut, runtime=a.runtime,
                                   calibration=a.calibration)
    if env_world()[0] == 0:  # under torchrun, one summary (rank 0's holds the totals of all ranks)
        print_json(summary)
        if summary["failed"]:
            print(f"{summary['failed']} image(s) could not be read; see {Path(a.out) / 'errors.jsonl'}",
                  file=sys.stderr)
    return 1 if summary["failed"] else 0


def _without_torch(a: argparse.Namespace, root: Path, names: list[str]) -> dict | None:
    """The store filled through ONNX Runtime without importing torch (encoders/quick_features.py), when the flags
    ask for an fp32 encoder on the CPU in one process and the last such run left a usable hint; else None."""
    if (a.runtime not in ("auto", "onnx") or a.device != "cpu" or a.precision != "fp32" or a.cut
            or a.calibration is not None or env_world()[1] > 1):
        return None
    from captioner.encoders.quick_features import features_key, features_without_torch

    return features_without_torch(root, names, Path(a.out), key=features_key(a.encoder, a.resize, a.image_size,
                                                                             a.grid, a.runtime),
                                  batch_size=a.batch_size, overwrite=a.overwrite, progress=not a.quiet,
                                  max_pixels=a.max_pixels if a.max_pixels is not None else DEFAULT_MAX_PIXELS)


def cmd_synth(a: argparse.Namespace) -> int:
    path = make_shapes_dataset(a.out, a.n, size=a.size, seed=a.seed, language=a.language)
    print(f"wrote {a.n} images and {path}")
    return 0


def add_parsers(sub, commands: Sequence[str] = COMMANDS) -> None:
    """The ``prepare``, ``features`` and ``synth`` subcommands (or those of ``commands``, in that order), added to
    ``sub`` (the top parser's subparsers): ``captioner --help`` lists the commands in the order they are added."""
    for name in commands:
        _PARSERS[name](sub)


def _add_prepare(sub) -> None:
    s = sub.add_parser("prepare", help="read a dataset into corpus.json + vocab.json + report.json")
    s.add_argument("format", choices=list(FORMATS))
    s.add_argument("source", help="flickr8k-text: the Flickr8k_text folder; karpathy: dataset_*.json; "
                                  "kaggle: captions.txt; coco: captions_*.json; folder: CSV/JSONL of captions")
    s.add_argument("extra", nargs="*", help="coco: more captions_*.json files")
    s.add_argument("--images", required=True, help="folder holding the images")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--min-freq", type=positive, default=5, help="words rarer than this in train become <unk>")
    s.add_argument("--max-words", type=positive, default=None, help="keep at most this many words (top-k)")
    s.add_argument("--max-len", type=positive, default=30, help="caption length (words) reported for truncation")
    s.add_argument("--strict", action="store_true", help="fail on any problem instead of reporting and skipping")
    s.add_argument("--dedupe", action="store_true",
                   help="drop an image's repeated captions (default: report them and keep every reference)")
    s.add_argument("--split-ratios", type=ratios, default=DEFAULT_RATIOS,
                   help="train,val,test ratios of the hash split used when the source has no split")
    s.add_argument("--split-seed", type=int, default=0, help="seed of the hash split")
    s.add_argument("--restval", choices=["train", "keep"], default="train",
                   help="karpathy: put 'restval' images into train (default) or keep them apart")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the corpus.json, vocab.json and report.json already in --out")
    s.set_defaults(func=cmd_prepare)


def _add_features(sub) -> None:
    s = sub.add_parser("features", help="cache encoder grids of images (resumable)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--corpus", help="corpus.json from `captioner prepare`")
    g.add_argument("--images", help="a folder of images (all of them)")
    s.add_argument("--splits", default=None, help="only these splits of the corpus, e.g. train,val")
    s.add_argument("--out", required=True, help="feature store folder")
    s.add_argument("--encoder", default="efficientnet-lite0")
    s.add_argument("--resize", choices=["squash", "center-crop"], default=None)
    s.add_argument("--image-size", type=positive, default=None)
    s.add_argument("--grid", type=positive, default=None,
                   help="average-pool the grid to N x N at any image size (e.g. --image-size 448 --grid 7)")
    s.add_argument("--cut", type=int, default=0,
                   help="a trunk store for fine-tuning the encoder's last N units (1 = its head, 2 = the head and "
                        "the last block, ...): the maps before them (default 0: the encoder's grids)")
    s.add_argument("--batch-size", type=positive, default=8)
    s.add_argument("--workers", type=workers, default=1,
                   help=f"image decoding processes, up to {MAX_WORKERS} (0: decode in this process); with an "
                        "inference runtime and several threads, the encoder's threads decode their own images instead")
    s.add_argument("--max-pixels", type=positive, default=None, help="decompression-bomb limit")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    device_options(s)
    runtime_options(s)
    s.set_defaults(func=cmd_features)


def _add_synth(sub) -> None:
    s = sub.add_parser("synth", help="write the synthetic shapes dataset (own-folder format)",
                       description="Write N images of two coloured shapes and captions.csv (image,caption,split) "
                                   "saying where they are, ready for `captioner prepare folder`.")
    s.add_argument("--out", required=True, help="output folder (images/ and captions.csv)")
    s.add_argument("--n", type=positive, default=300, help="number of images (default 300)")
    s.add_argument("--size", type=int, default=96, help="image side in pixels, at least 24 (default 96)")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same files (default 0)")
    s.add_argument("--language", choices=LANGUAGES, default="en",
                   help="language of the captions: English, French, German, Japanese, Chinese (default en); "
                        "the images do not depend on it")
    s.set_defaults(func=cmd_synth)


_PARSERS = {"prepare": _add_prepare, "features": _add_features, "synth": _add_synth}
