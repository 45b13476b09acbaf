"""`captioner ensemble`: write a model directory that decodes several models as one (docs/formats.md)."""

from __future__ import annotations

import argparse
import json

from captioner.cli.args import decoding_flags, decoding_overrides, print_json
from captioner.decoding.settings import SETTINGS

DEFAULTS = [name for name in SETTINGS if name != "mention"]  # a model's decoding defaults never force words


def add_parser(sub) -> None:
    s = sub.add_parser("ensemble", help="write a model directory that decodes several models as one",
                       description="Copy the model directories into a new one that decodes them as one ensemble "
                                   "(their log-probabilities averaged at each word). They must share the vocabulary "
                                   "and the encoder. Its decoding defaults are the first model's, with the flags "
                                   "given over them.")
    s.add_argument("models", nargs="+", metavar="MODEL", help="model directories or bundled model names")
    s.add_argument("--out", required=True, help="the ensemble's directory to write (new or empty)")
    s.add_argument("--name", default=None, help="the name the server shows (default: the directory's)")
    decoding_flags(s.add_argument_group("decoding defaults (default: the first model's)"), DEFAULTS)
    s.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from captioner.inference.ensemble_dir import write_ensemble  # torch: not for `captioner --help`

    decoding = {k: list(v) if isinstance(v, tuple) else v
                for k, v in decoding_overrides(a, DEFAULTS).items() if v is not None}
    out = write_ensemble(a.models, a.out, decoding=decoding, name=a.name)
    cfg = json.loads((out / "config.json").read_text())
    print_json({"model": str(out), "members": cfg["ensemble"]["members"], "decoding": cfg["decoding"]})
    return 0
