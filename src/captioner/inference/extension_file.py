"""A model directory's vocabulary extension (:mod:`captioner.models.extension`): written and checked.

    extension.safetensors   embed (n, E), out_weight (n, H), out_bias (n,): the rows of the n added words
    config.json             "vocab_extension": {"words": [...], "vectors": ..., "method": ..., "neighbours": ...}

A directory without them has no extension. Both are read through the same limits as the weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from captioner.data.text import Vocab, _itos_problem, _unprintable_word
from captioner.files import WEIGHTS_BYTES, FileTooLargeError, NotRegularFileError, check_regular
from captioner.models.base import Decoder
from captioner.models.extension import MAX_EXTENSION_WORDS, VocabExtension, output_layer
from captioner.models.wordvec import WORD_VECTORS

FILE = "extension.safetensors"
KEY = "vocab_extension"


class ExtensionFileError(ValueError):
    pass


def write_extension(out: Path, ext: VocabExtension | None, config: dict) -> tuple[dict, Callable[[], None]]:
    """Write ``ext``'s rows beside the model directory ``out``'s files, to a temporary file: returns ``config``
    with its record (or without one, for no extension) and the function that puts the file in place (or
    removes a stale one), to be called once config.json is written, just before it replaces the old one, so
    that a failed write (a full disk) leaves the directory as it was. ``discard`` of the pair: :func:`discard`."""
    config = {k: v for k, v in config.items() if k != KEY}
    target, tmp = out / FILE, out / (FILE + ".tmp")
    if ext is None or not len(ext):
        return config, lambda: target.unlink(missing_ok=True)
    try:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in ext.tensors().items()}, str(tmp),
                  metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
    except Exception:
        discard(out)
        raise
    return {**config, KEY: ext.record()}, lambda: os.replace(tmp, target)


def discard(out: Path) -> None:
    """Remove an extension's temporary file left by a write that failed."""
    (out / (FILE + ".tmp")).unlink(missing_ok=True)


def _words_problem(record: Any, vocab: Vocab) -> str | None:
    if not isinstance(record, dict):
        return "must be an object"
    words = record.get("words")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        return "words must be a list of strings"
    if len(words) > MAX_EXTENSION_WORDS:
        return f"holds {len(words)} words, more than {MAX_EXTENSION_WORDS}"
    inside = [w for w in words if w in vocab]
    if inside:
        return f"{inside[0]!r} is in vocab.json already"
    # the vocabulary's own rules (vocab.json's): no empty word, none twice, no whitespace or control character
    problem = _itos_problem(vocab.itos + words) or _unprintable_word(vocab.itos + words)
    if problem:
        return problem.replace("'itos' entry", "word")
    if record.get("vectors") not in WORD_VECTORS:
        return f"vectors must be one of {', '.join(WORD_VECTORS)}, got {record.get('vectors')!r}"
    return None


def load_extension(p: Path, decoder: Decoder, vocab: Vocab, config: dict) -> VocabExtension | None:
    """The extension of the model directory ``p`` (its config.json already read as ``config``), checked
    against the decoder's sizes; None when it has none. ExtensionFileError names the file and the problem."""
    record = config.get(KEY)
    target = p / FILE
    if record is None:
        if target.exists():
            raise ExtensionFileError(f"{target}: config.json names no vocab_extension; remove the file or add its "
                                     "record with `captioner vocab extend`")
        return None
    problem = _words_problem(record, vocab)
    if problem:
        raise ExtensionFileError(f"{p / 'config.json'}: vocab_extension {problem}")
    try:
        state = load_file(str(check_regular(target, "the vocabulary extension", WEIGHTS_BYTES)))
    except FileNotFoundError:
        raise ExtensionFileError(f"{target}: missing, but config.json names a vocab_extension") from None
    except (NotRegularFileError, FileTooLargeError) as e:
        raise ExtensionFileError(str(e)) from None
    except Exception as e:  # safetensors' own errors for damaged files
        raise ExtensionFileError(f"{target}: cannot read ({e})") from None
    n, out = len(record["words"]), output_layer(decoder)
    shapes = {"embed": (n, decoder.embed.embedding_dim), "out_weight": (n, out.in_features), "out_bias": (n,)}
    for key, shape in shapes.items():
        t = state.get(key)
        if t is None or tuple(t.shape) != shape or not t.is_floating_point():
            got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise ExtensionFileError(f"{target}: {key} must be floating point of shape {shape}, found {got}; the "
                                     "file does not belong to this model")
        if not bool(torch.isfinite(t).all()):
            raise ExtensionFileError(f"{target}: {key} holds NaN or infinite values")
    if set(state) - set(shapes):
        raise ExtensionFileError(f"{target}: unexpected tensors {sorted(set(state) - set(shapes))[:3]}")
    device = decoder.embed.weight.device
    return VocabExtension(list(record["words"]), state["embed"].float().to(device),
                          state["out_weight"].float().to(device), state["out_bias"].float().to(device),
                          record["vectors"], _neighbours(record.get("neighbours")))


def _neighbours(listed: Any) -> dict[str, list[tuple[str, float]]]:
    """The record's "neighbours" ("elephant 0.2522, crocodile 0.2380" per word), for information only: an
    entry that does not read so is left out."""
    out: dict[str, list[tuple[str, float]]] = {}
    for word, text in (listed.items() if isinstance(listed, dict) else []):
        try:
            out[word] = [(n, float(x)) for n, x in (item.rsplit(" ", 1) for item in text.split(", ") if item)]
        except (AttributeError, ValueError):
            continue
    return out
