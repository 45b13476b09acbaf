"""`captioner vocab`: a model's vocabulary. ``vocab extend`` teaches a trained model new words without retraining
(:mod:`captioner.models.extension`); ``vocab show`` lists what it can say."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from captioner.cli.args import print_json


def add_parser(sub) -> None:
    s = sub.add_parser("vocab", help="a model's vocabulary: show it, or extend it with new words")
    cmds = s.add_subparsers(dest="vocab_command", required=True)
    e = cmds.add_parser("extend", help="add words to a trained model (their rows come from related known words)")
    e.add_argument("model", help="model directory or bundled model name")
    e.add_argument("--out", required=True, help="the extended model directory to write (may be the model's own)")
    e.add_argument("--words", default="", help="words to add, comma-separated")
    e.add_argument("--concept-words", action="store_true",
                   help="add every word of the ImageNet concept mapping the model lacks")
    e.set_defaults(func=run_extend)
    v = cmds.add_parser("show", help="the model's vocabulary size, its added words and how each was made")
    v.add_argument("model", help="model directory or bundled model name")
    v.add_argument("--json", action="store_true", help="one JSON object")
    v.set_defaults(func=run_show)


def run_extend(a: argparse.Namespace) -> int:
    from captioner.encoders.concepts import default_mapping  # torch: not for `captioner --help`
    from captioner.inference.captioner import Captioner
    from captioner.inference.ensemble_dir import extend_ensemble_dir
    from captioner.inference.extension_file import discard, write_extension
    from captioner.inference.modeldir import resolve_model_path
    from captioner.models.ensemble import Ensemble
    from captioner.models.extension import MAX_EXTENSION_WORDS, transfer, unknown_words

    model = Captioner.from_pretrained(a.model)
    words = [w.strip().lower() for w in a.words.split(",") if w.strip()]
    if a.concept_words:
        words += [w for w in default_mapping().words if w not in words]
    if not words:
        raise ValueError("vocab extend: no words to add; give --words w1,w2 and/or --concept-words")
    have = set(model.vocab.itos) | set(model.guide.extension.words)
    words = list(dict.fromkeys(words))
    new = [w for w in words if w not in have]
    unknown = unknown_words(new, model.guide.extension.vectors)
    if unknown and not a.concept_words:
        raise ValueError(f"vocab extend: {', '.join(unknown[:10])}: not known to the word vectors, so they cannot "
                         "be added")
    new = [w for w in new if w not in unknown]
    if len(model.guide.extension) + len(new) > MAX_EXTENSION_WORDS:
        raise ValueError(f"vocab extend: {a.model} holds {len(model.guide.extension)} added words; {len(new)} more "
                         f"would pass the limit of {MAX_EXTENSION_WORDS}")
    extension = model.guide.extension.merged(transfer(model.decoder, model.vocab, new))
    out = Path(a.out)
    source = resolve_model_path(a.model)
    if isinstance(model.decoder, Ensemble):  # each member's rows in its own directory
        extend_ensemble_dir(source, out, model.decoder, extension)
        _report(out, words, new, unknown, extension)
        return 0
    if out.resolve() != source.resolve():  # the weights are copied as they are (their dtype kept), not rewritten
        out.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "vocab.json", "encoder.safetensors"):  # the last: a tuned encoder's
            if name != "encoder.safetensors" or (source / name).exists():
                shutil.copyfile(source / name, out / name)
    config, place_extension = write_extension(out, extension, model.config)
    tmp = out / "config.json.tmp"
    try:  # both files written before either replaces the old one
        tmp.write_text(json.dumps(config, indent=2))
        place_extension()
        os.replace(tmp, out / "config.json")
    except OSError as e:
        discard(out)
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{out}: cannot write the model directory ({e.strerror or e}); is the disk full?") from None
    _report(out, words, new, unknown, extension)
    return 0


def _report(out: Path, words: list[str], new: list[str], unknown: list[str], extension) -> None:
    print_json({"model": str(out), "added": len(new), "already_known": len(words) - len(new) - len(unknown),
                "not_in_word_vectors": unknown, "extension_words": len(extension)})


def run_show(a: argparse.Namespace) -> int:
    from captioner.inference.captioner import Captioner  # torch: not for `captioner --help`

    model = Captioner.from_pretrained(a.model)
    ext = model.guide.extension
    info = {"model": a.model, "vocabulary": len(model.vocab), "added": len(ext),
            "added_words": {w: [n for n, _ in ext.neighbours.get(w, [])] for w in ext.words}}
    if a.json:
        print_json(info)
        return 0
    print(f"{a.model}: {len(model.vocab)} words from its training captions, {len(ext)} added")
    for w in ext.words:
        print(f"  {w}: from {', '.join(n for n, _ in ext.neighbours.get(w, [])) or '(unrecorded)'}")
    return 0
